//! Key-value operations: range, put, delete, txn, compact. Reads are retried
//! on any failure, writes only when they provably never reached a member.

use keel_types::etcdserverpb::request_op::Request;
use keel_types::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use keel_types::mvccpb::KeyValue;

use crate::api::etcdserverpb::kv_client::KvClient;
use crate::client::{Policy, Retry};
use crate::error::ClientError;
use crate::{prefix_end, Client};

impl Client {
    fn kv_client(&self, channel: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
        KvClient::new(channel)
            .max_decoding_message_size(self.inner.config.response_bytes_max)
            .max_encoding_message_size(self.inner.config.request_bytes_max)
    }

    /// A Range as given (key, range_end, revision, limit, serializable, …).
    /// Linearizable unless `serializable`; sent to any healthy member.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, ClientError> {
        self.check_size(&request)?;
        self.call(Policy::READ, |channel| {
            let request = request.clone();
            let mut client = self.kv_client(channel);
            async move { client.range(request).await }
        })
        .await
    }

    /// The newest value of `key`, linearizably, or `None`.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, ClientError> {
        let response = self
            .range(RangeRequest {
                key: key.into(),
                ..RangeRequest::default()
            })
            .await?;
        Ok(response.kvs.into_iter().next())
    }

    /// Every key starting with `prefix`, linearizably.
    pub async fn get_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<RangeResponse, ClientError> {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        self.range(RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        })
        .await
    }

    /// A Put as given (with a lease, prev_kv, ignore_value, …).
    pub async fn put_request(&self, request: PutRequest) -> Result<PutResponse, ClientError> {
        self.check_size(&request)?;
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.kv_client(channel);
            async move { client.put(request).await }
        })
        .await
    }

    /// Writes `value` at `key`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<PutResponse, ClientError> {
        self.put_request(PutRequest {
            key: key.into(),
            value: value.into(),
            ..PutRequest::default()
        })
        .await
    }

    /// Writes `value` at `key`, attached to `lease` (the key goes with the lease).
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<PutResponse, ClientError> {
        self.put_request(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..PutRequest::default()
        })
        .await
    }

    /// A DeleteRange as given.
    pub async fn delete_range(
        &self,
        request: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ClientError> {
        self.check_size(&request)?;
        self.call(Policy::WRITE, |channel| {
            let request = request.clone();
            let mut client = self.kv_client(channel);
            async move { client.delete_range(request).await }
        })
        .await
    }

    /// Deletes `key`.
    pub async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
    ) -> Result<DeleteRangeResponse, ClientError> {
        self.delete_range(DeleteRangeRequest {
            key: key.into(),
            ..DeleteRangeRequest::default()
        })
        .await
    }

    /// Deletes every key starting with `prefix`.
    pub async fn delete_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<DeleteRangeResponse, ClientError> {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        self.delete_range(DeleteRangeRequest {
            key,
            range_end,
            ..DeleteRangeRequest::default()
        })
        .await
    }

    /// A transaction (build one with [`crate::txn`]). One whose operations are
    /// all reads is retried like a read; any other like a write.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, ClientError> {
        self.check_size(&request)?;
        let policy = if read_only(&request) {
            Policy {
                retry: Retry::Always,
                ..Policy::WRITE
            }
        } else {
            Policy::WRITE
        };
        self.call(policy, |channel| {
            let request = request.clone();
            let mut client = self.kv_client(channel);
            async move { client.txn(request).await }
        })
        .await
    }

    /// Compacts the key space's history up to `revision` (`physical`: answer
    /// only once the compaction is applied).
    pub async fn compact(
        &self,
        revision: i64,
        physical: bool,
    ) -> Result<CompactionResponse, ClientError> {
        let request = CompactionRequest { revision, physical };
        self.call(Policy::WRITE, |channel| {
            let mut client = self.kv_client(channel);
            async move { client.compact(request).await }
        })
        .await
    }
}

/// Whether every operation of a transaction (nested ones included) only reads.
fn read_only(request: &TxnRequest) -> bool {
    request
        .success
        .iter()
        .chain(&request.failure)
        .all(|operation| match &operation.request {
            Some(Request::RequestRange(_)) | None => true,
            Some(Request::RequestTxn(nested)) => read_only(nested),
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txn;

    #[test]
    fn read_only_transactions_are_recognised() {
        let reads = TxnRequest {
            compare: vec![txn::compare_version("k", txn::CompareResult::Equal, 0)],
            success: vec![txn::get("k")],
            failure: vec![txn::nested(TxnRequest {
                success: vec![txn::get_prefix("p")],
                ..TxnRequest::default()
            })],
        };
        assert!(read_only(&reads));
        let writes = TxnRequest {
            failure: vec![txn::nested(TxnRequest {
                success: vec![txn::put("k", "v")],
                ..TxnRequest::default()
            })],
            ..reads.clone()
        };
        assert!(!read_only(&writes));
    }
}
