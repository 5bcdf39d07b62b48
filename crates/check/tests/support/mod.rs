//! Builders for hand-written key-value histories, shared by the integration tests.
//!
//! Each builder takes the client, the call time and the return time first, then the request
//! and its answer, so that a history reads like a table.

#![allow(dead_code)]

use keel_check::{Bytes, Input, Operation, Output};

pub fn put(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    value: &str,
    revision: u64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::Put {
            key: key.into(),
            value: value.into(),
        },
        output: Output::Put { revision },
    }
}

pub fn put_unknown(client_id: u64, call_time: u64, key: &str, value: &str) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: None,
        input: Input::Put {
            key: key.into(),
            value: value.into(),
        },
        output: Output::Unknown,
    }
}

pub fn get(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    value: Option<&str>,
    mod_revision: u64,
    revision: u64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::Get {
            key: key.into(),
            serializable: false,
        },
        output: Output::Get {
            value: value.map(Bytes::from),
            mod_revision,
            revision,
        },
    }
}

pub fn serializable_get(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    value: Option<&str>,
    mod_revision: u64,
    revision: u64,
) -> Operation {
    let mut operation = get(
        client_id,
        call_time,
        return_time,
        key,
        value,
        mod_revision,
        revision,
    );
    operation.input = Input::Get {
        key: key.into(),
        serializable: true,
    };
    operation
}

pub fn delete(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    deleted: u64,
    revision: u64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::Delete { key: key.into() },
        output: Output::Delete { deleted, revision },
    }
}

#[allow(clippy::too_many_arguments)]
pub fn compare_and_swap(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    expected: Option<&str>,
    new_value: &str,
    succeeded: bool,
    revision: u64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::CompareAndSwap {
            key: key.into(),
            expected: expected.map(Bytes::from),
            new_value: new_value.into(),
        },
        output: Output::CompareAndSwap {
            succeeded,
            revision,
        },
    }
}

pub fn compare_and_swap_unknown(
    client_id: u64,
    call_time: u64,
    key: &str,
    expected: Option<&str>,
    new_value: &str,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: None,
        input: Input::CompareAndSwap {
            key: key.into(),
            expected: expected.map(Bytes::from),
            new_value: new_value.into(),
        },
        output: Output::Unknown,
    }
}

pub fn grant(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    lease_id: i64,
    revision: u64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::LeaseGrant {
            lease_id,
            ttl_seconds: 5,
        },
        output: Output::LeaseGrant { revision },
    }
}

#[allow(clippy::too_many_arguments)]
pub fn put_with_lease(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    key: &str,
    value: &str,
    lease_id: i64,
    output: Output,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::PutWithLease {
            key: key.into(),
            value: value.into(),
            lease_id,
        },
        output,
    }
}

pub fn keep_alive(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    lease_id: i64,
    ttl_seconds: i64,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::LeaseKeepAlive { lease_id },
        output: Output::LeaseKeepAlive { ttl_seconds },
    }
}

pub fn revoke(
    client_id: u64,
    call_time: u64,
    return_time: u64,
    lease_id: i64,
    output: Output,
) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: Some(return_time),
        input: Input::LeaseRevoke { lease_id },
        output,
    }
}

pub fn revoke_unknown(client_id: u64, call_time: u64, lease_id: i64) -> Operation {
    Operation {
        client_id,
        call_time,
        return_time: None,
        input: Input::LeaseRevoke { lease_id },
        output: Output::Unknown,
    }
}
