//! etcd's Election service (being written).

use crate::grpc::Services;

/// The Election service over one member.
#[derive(Clone)]
pub struct ElectionService {
    #[allow(dead_code)]
    services: Services,
}

impl ElectionService {
    /// An Election service over `services`.
    pub fn new(services: Services) -> Self {
        ElectionService { services }
    }
}

#[tonic::async_trait]
impl crate::api::v3electionpb::election_server::Election for ElectionService {}
