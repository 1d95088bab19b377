"""Check a scan on the user's own model: do its layers predict what fine-tuning changes, and is it stable?"""
