//! etcd's Lock service (being written).

use crate::grpc::Services;

/// The Lock service over one member.
#[derive(Clone)]
pub struct LockService {
    #[allow(dead_code)]
    services: Services,
}

impl LockService {
    /// A Lock service over `services`.
    pub fn new(services: Services) -> Self {
        LockService { services }
    }
}

#[tonic::async_trait]
impl crate::api::v3lockpb::lock_server::Lock for LockService {}
