"""Plumbing every part of critlayer shares: errors, result folders, processes, memory, fetching, statistics."""
