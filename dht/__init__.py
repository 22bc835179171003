"""Kademlia DHT: sans-IO routing table and lookup, signed expiring records, and a thin RPC layer."""
