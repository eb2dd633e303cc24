"""Pricing drops: the ledger (plans, claims, heartbeat), shard work, finishing, and the one runner."""
