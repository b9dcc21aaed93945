//! Who a workload is and what it may do: SPIFFE identities and their
//! certificates, mTLS configuration, and authorization policies.
pub mod authorization;
pub mod identity;
pub mod origination;
pub mod tls;
