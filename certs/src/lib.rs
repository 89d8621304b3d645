//! Certificate authority, cluster certificates, trust bundles and rustls configs for the mesh.
