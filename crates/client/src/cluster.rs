//! Membership and maintenance calls: member list/add/remove/update/promote,
//! move-leader and alarms. Calls meant for one particular member (defragment,
//! hash, snapshot) go through [`Client::channel`] with the generated stubs in
//! [`crate::api`].

use keel_types::etcdserverpb::alarm_request::AlarmAction;
use keel_types::etcdserverpb::{
    AlarmRequest, AlarmResponse, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest,
    MoveLeaderResponse,
};
use tonic::transport::Channel;

use crate::api::etcdserverpb::cluster_client::ClusterClient;
use crate::api::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::client::Policy;
use crate::error::ClientError;
use crate::Client;

impl Client {
    fn cluster_client(&self, channel: Channel) -> ClusterClient<Channel> {
        ClusterClient::new(channel).max_decoding_message_size(self.inner.config.response_bytes_max)
    }

    fn maintenance_client(&self, channel: Channel) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(channel)
            .max_decoding_message_size(self.inner.config.response_bytes_max)
    }

    /// The cluster's members (`linearizable`: confirmed by a quorum).
    pub async fn member_list(&self, linearizable: bool) -> Result<MemberListResponse, ClientError> {
        let request = MemberListRequest { linearizable };
        self.call(Policy::READ, |channel| {
            let mut client = self.cluster_client(channel);
            async move { client.member_list(request).await }
        })
        .await
    }

    /// Adds a member (as a learner if `is_learner`) with these peer URLs.
    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<MemberAddResponse, ClientError> {
        let request = MemberAddRequest {
            peer_ur_ls: peer_urls,
            is_learner,
        };
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.cluster_client(channel);
            async move { client.member_add(request).await }
        })
        .await
    }

    /// Removes member `id`.
    pub async fn member_remove(&self, id: u64) -> Result<MemberRemoveResponse, ClientError> {
        let request = MemberRemoveRequest { id };
        self.call(Policy::WRITE, |channel| {
            let mut client = self.cluster_client(channel);
            async move { client.member_remove(request).await }
        })
        .await
    }

    /// Replaces member `id`'s peer URLs.
    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<MemberUpdateResponse, ClientError> {
        let request = MemberUpdateRequest {
            id,
            peer_ur_ls: peer_urls,
        };
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.cluster_client(channel);
            async move { client.member_update(request).await }
        })
        .await
    }

    /// Promotes learner `id` to a voting member.
    pub async fn member_promote(&self, id: u64) -> Result<MemberPromoteResponse, ClientError> {
        let request = MemberPromoteRequest { id };
        self.call(Policy::WRITE, |channel| {
            let mut client = self.cluster_client(channel);
            async move { client.member_promote(request).await }
        })
        .await
    }

    /// Hands leadership to member `target_id`.
    pub async fn move_leader(&self, target_id: u64) -> Result<MoveLeaderResponse, ClientError> {
        let request = MoveLeaderRequest { target_id };
        self.call(Policy::WRITE, |channel| {
            let mut client = self.maintenance_client(channel);
            async move { client.move_leader(request).await }
        })
        .await
    }

    /// An Alarm request as given (list, activate, deactivate). Listing is a
    /// read, retried like one.
    pub async fn alarm(&self, request: AlarmRequest) -> Result<AlarmResponse, ClientError> {
        let policy = if request.action == AlarmAction::Get as i32 {
            Policy::READ
        } else {
            Policy::WRITE
        };
        self.call(policy, |channel| {
            let mut client = self.maintenance_client(channel);
            async move { client.alarm(request).await }
        })
        .await
    }
}
