//! etcd's Auth service, as a cluster without authentication answers it.
//!
//! keel has no users, roles or tokens: every client may do everything, as on
//! an etcd cluster where `auth enable` was never run. Such an etcd answers
//! Authenticate with "authentication is not enabled" (FailedPrecondition), and
//! clients (Patroni, etcdctl with `--user`) recognise that answer; so does keel,
//! over gRPC and the JSON gateway alike. Every other Auth method answers
//! Unimplemented (the generated default), since enabling authentication or
//! managing users is not something keel can do.

use keel_types::etcdserverpb::{AuthenticateRequest, AuthenticateResponse};
use tonic::{Request, Status};

use crate::api::etcdserverpb::auth_server;

/// etcd's error for an authentication call on a cluster without it
/// (`rpctypes.ErrGRPCAuthNotEnabled`).
pub const AUTH_NOT_ENABLED_MESSAGE: &str = "etcdserver: authentication is not enabled";

/// The Auth service of a cluster without authentication.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthService;

#[tonic::async_trait]
impl auth_server::Auth for AuthService {
    async fn authenticate(
        &self,
        _request: Request<AuthenticateRequest>,
    ) -> Result<tonic::Response<AuthenticateResponse>, Status> {
        Err(Status::failed_precondition(AUTH_NOT_ENABLED_MESSAGE))
    }
}
