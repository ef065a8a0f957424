"""The edit stage of covedit and everything about models (loading, hooks, keys, targets, updates)."""
