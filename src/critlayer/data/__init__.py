"""Text: built-in corpora from pinned wheels, the user's files, and the fixed train / held-out split."""
