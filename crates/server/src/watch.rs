//! etcd's Watch service (being written).

use crate::grpc::Services;

/// The Watch service over one member.
#[derive(Clone)]
pub struct WatchService {
    #[allow(dead_code)]
    services: Services,
}

impl WatchService {
    /// A Watch service reading history and revisions through `services`.
    pub fn new(services: Services) -> Self {
        WatchService { services }
    }
}

#[tonic::async_trait]
impl crate::api::etcdserverpb::watch_server::Watch for WatchService {}
