//! Failover drills and randomized fault runs on the mesh lab.
