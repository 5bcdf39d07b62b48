//! Deterministic simulation of keel clusters (being written).
