//! Loader and typed map API for the global service socket load balancer.
