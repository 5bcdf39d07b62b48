//! `keel bench --protocol zookeeper`: the same clients, pacing, key space and
//! report against a ZooKeeper ensemble, so that one table can hold etcd,
//! keel and ZooKeeper measured by one load generator.
//!
//! The operations are ZooKeeper's equivalents of etcd's: `put` is `setData`
//! of an existing znode (written through the leader and fsynced by a quorum
//! with ZooKeeper's default `forceSync=yes`, as a keel put is);
//! `range --serializable` is `getData`, answered by the server the session
//! is connected to (ZooKeeper's reads are sequentially consistent, as a
//! serializable range is); `range` is `sync` then `getData`, ZooKeeper's way
//! to read what was committed before the read began. Keys are znodes: key
//! `bench/0000000042` is `/bench/0000000042`. Every znode of the key space is
//! created, with a value of `--value-size` bytes, before the clock starts,
//! because `setData` needs the znode to exist.

use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use zookeeper_client as zk;

use super::report::OperationError;
use super::Plan;

/// Znode creations in flight while preparing the key space.
const CREATIONS_IN_FLIGHT_MAX: usize = 256;
/// Session timeout asked of the ensemble (it clamps it to its own bounds).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The znode path of a bench key.
pub fn path(key: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(key))
}

/// Opens the sessions, spread over the endpoints round-robin; fails, naming
/// the endpoint, if one does not answer.
pub async fn connect_all(plan: &Plan) -> anyhow::Result<Vec<zk::Client>> {
    let mut sessions = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let endpoint = &plan.endpoints[index % plan.endpoints.len()];
        let session = zk::Client::connector()
            .with_session_timeout(SESSION_TIMEOUT)
            .connect(endpoint)
            .await
            .with_context(|| format!("connecting to ZooKeeper at {endpoint}"))?;
        sessions.push(session);
    }
    Ok(sessions)
}

/// Creates the parent znode and every znode of the key space that does not
/// exist yet, `CREATIONS_IN_FLIGHT_MAX` at a time.
pub async fn prepare(plan: &Plan, session: &zk::Client) -> anyhow::Result<()> {
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let parent = path(&plan.key(0));
    let parent = &parent[..parent.rfind('/').unwrap_or(parent.len())];
    create_if_missing(session, parent.to_owned(), Vec::new(), &options).await?;
    let value = vec![b'v'; plan.value_size];
    let mut creations = JoinSet::new();
    for index in 0..plan.key_space_size {
        if creations.len() >= CREATIONS_IN_FLIGHT_MAX {
            creations.join_next().await.expect("not empty")??;
        }
        let (session, path, value) = (session.clone(), path(&plan.key(index)), value.clone());
        creations.spawn(async move {
            let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
            create_if_missing(&session, path, value, &options).await
        });
    }
    while let Some(creation) = creations.join_next().await {
        creation??;
    }
    Ok(())
}

async fn create_if_missing(
    session: &zk::Client,
    path: String,
    value: Vec<u8>,
    options: &zk::CreateOptions<'_>,
) -> anyhow::Result<()> {
    match session.create(&path, &value, options).await {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("creating znode {path}")),
    }
}

/// `setData` of the key's znode, any version.
pub async fn set_data(
    session: &zk::Client,
    key: &[u8],
    value: &[u8],
) -> Result<(), OperationError> {
    session
        .set_data(&path(key), value, None)
        .await
        .map(drop)
        .map_err(|error| failure("setData", error))
}

/// `getData` of the key's znode, after a `sync` when `linearizable`.
pub async fn get_data(
    session: &zk::Client,
    key: &[u8],
    linearizable: bool,
) -> Result<(), OperationError> {
    let path = path(key);
    if linearizable {
        session
            .sync(&path)
            .await
            .map_err(|error| failure("sync", error))?;
    }
    session
        .get_data(&path)
        .await
        .map(drop)
        .map_err(|error| failure("getData", error))
}

/// The error's kind is its variant's name (`ConnectionLoss`, `NoNode`, …).
fn failure(request: &'static str, error: zk::Error) -> OperationError {
    let debug = format!("{error:?}");
    let kind = debug
        .split(|character: char| !character.is_alphanumeric())
        .next()
        .unwrap_or_default();
    OperationError::new(request, kind, &error.to_string())
}
