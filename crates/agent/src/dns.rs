//! The agent's DNS interface to the service registry, on UDP and TCP at
//! `--dns-addr`, for the domain `--dns-domain` (default `keel`), as Consul's:
//!
//! - `<name>.service.<domain>` and `<tag>.<name>.service.<domain>`: A (AAAA)
//!   records of the *passing* instances, or SRV records (priority 1, the
//!   instance's passing weight, its port, target `<node>.node.<domain>`) with
//!   the targets' addresses as additional records. An instance whose address
//!   is not its node's gets Consul's `<hex address>.addr.<domain>` target
//!   instead, so a target name never resolves to two different addresses.
//!   Instances come in weighted random order (Consul's `Weights.Passing`):
//!   an instance of weight 2 is first twice as often as one of weight 1.
//! - `<node>.node.<domain>` and `<hex address>.addr.<domain>`: A (AAAA).
//! - Any other name in the domain: NXDOMAIN (also a service with no passing
//!   instance, as Consul). A name outside the domain: REFUSED (this is not a
//!   recursive resolver).
//! - TTL 0 by default, as Consul: health changes take effect at once.
//!
//! The answers come from a [`Catalog`] the agent implements over its view of
//! the registry; this module only speaks DNS. hickory parses and encodes
//! messages (including truncation for UDP); UDP is served by hickory's
//! `Server`. TCP is accepted here, because hickory's TCP listener has no
//! connection limit: each connection takes a permit of
//! [`DnsConfig::tcp_connections_max`] or is closed at once, and is closed
//! after [`DnsConfig::tcp_idle_timeout`] without a request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::tcp::TcpStream as DnsTcpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{
    Request, RequestHandler, ResponseHandle, ResponseHandler, ResponseInfo, TimeoutStream,
};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use rand::Rng;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

/// Default domain (`--dns-domain`).
pub const DEFAULT_DOMAIN: &str = "keel";
/// Default TTL: 0, as Consul, so a failed instance leaves clients' caches at once.
pub const DEFAULT_TTL_SECONDS: u32 = 0;
/// Default limit on records in the answer section. Consul answers 3 A
/// records over UDP by default (`udp_answer_limit`); 8 keeps SRV answers
/// plus their additional records within 512-byte UDP replies for short
/// names, and a client that wants all instances uses the HTTP API.
pub const DEFAULT_ANSWERS_MAX: usize = 8;
/// Default limit on TCP connections served at once; more are closed at accept.
pub const DEFAULT_TCP_CONNECTIONS_MAX: usize = 64;
/// Default time a TCP connection may stay without a request.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued for one TCP connection before the handler waits.
const TCP_RESPONSES_QUEUED_MAX: usize = 16;

/// One instance, as DNS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsInstance {
    /// The node the instance runs on (the SRV target is `<node>.node.<domain>`).
    pub node: String,
    /// The instance's address (its service address, or its node's).
    pub address: IpAddr,
    pub port: u16,
    /// Consul's `Weights.Passing`: the relative share of answers it comes first in.
    pub weight: u32,
}

/// What DNS asks of the registry. The agent implements it over its last view
/// of the store (and gossip); both calls are made on every query, so they
/// must be cheap and must not block.
pub trait Catalog: Send + Sync + 'static {
    /// The *passing* instances of `service` (with `tag`, if given). Service
    /// and tag arrive lowercased (DNS is case-insensitive); the catalog
    /// compares them case-insensitively.
    fn passing_instances(&self, service: &str, tag: Option<&str>) -> Vec<DnsInstance>;
    /// The address of a registered node, `None` if there is no such node.
    fn node_address(&self, node: &str) -> Option<IpAddr>;
}

/// How to serve DNS. `DnsConfig::new` fills in the defaults.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address (`--dns-addr`).
    pub addr: SocketAddr,
    /// Domain answered (`--dns-domain`), without dots at the ends.
    pub domain: String,
    pub ttl_seconds: u32,
    pub answers_max: usize,
    pub tcp_connections_max: usize,
    pub tcp_idle_timeout: Duration,
}

impl DnsConfig {
    pub fn new(addr: SocketAddr) -> DnsConfig {
        DnsConfig {
            addr,
            domain: DEFAULT_DOMAIN.to_string(),
            ttl_seconds: DEFAULT_TTL_SECONDS,
            answers_max: DEFAULT_ANSWERS_MAX,
            tcp_connections_max: DEFAULT_TCP_CONNECTIONS_MAX,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }
}

/// Why DNS could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    #[error("invalid DNS configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot listen for DNS on {protocol} {addr}: {source}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running DNS server. Dropping it stops serving.
pub struct DnsServer {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    udp_server: Server<DnsHandler>,
    tcp_task: JoinHandle<()>,
}

impl DnsServer {
    /// Binds UDP and TCP at `config.addr` (port 0 picks a free UDP port,
    /// and TCP binds the same one) and starts answering from `catalog`.
    /// Must be called inside a tokio runtime, which runs the server tasks.
    pub async fn start(
        config: DnsConfig,
        catalog: Arc<dyn Catalog>,
    ) -> Result<DnsServer, DnsError> {
        let origin = origin_of(&config.domain)?;
        if config.answers_max == 0 {
            return Err(DnsError::InvalidConfig {
                field: "answers_max",
                reason: "must be at least 1".into(),
            });
        }
        if config.tcp_connections_max == 0 {
            return Err(DnsError::InvalidConfig {
                field: "tcp_connections_max",
                reason: "must be at least 1".into(),
            });
        }
        let udp_socket = UdpSocket::bind(config.addr)
            .await
            .map_err(|source| DnsError::Bind {
                protocol: "UDP",
                addr: config.addr,
                source,
            })?;
        let udp_addr = udp_socket.local_addr().map_err(|source| DnsError::Bind {
            protocol: "UDP",
            addr: config.addr,
            source,
        })?;
        let tcp_bind_addr = SocketAddr::new(config.addr.ip(), udp_addr.port());
        let tcp_listener =
            TcpListener::bind(tcp_bind_addr)
                .await
                .map_err(|source| DnsError::Bind {
                    protocol: "TCP",
                    addr: tcp_bind_addr,
                    source,
                })?;
        let tcp_addr = tcp_listener.local_addr().map_err(|source| DnsError::Bind {
            protocol: "TCP",
            addr: tcp_bind_addr,
            source,
        })?;
        let handler = DnsHandler {
            catalog,
            origin: Arc::new(origin),
            domain_labels: config
                .domain
                .split('.')
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .into(),
            ttl_seconds: config.ttl_seconds,
            answers_max: config.answers_max,
        };
        let mut udp_server = Server::new(handler.clone());
        udp_server.register_socket(udp_socket);
        let tcp_task = tokio::spawn(serve_tcp(
            tcp_listener,
            handler,
            Arc::new(Semaphore::new(config.tcp_connections_max)),
            config.tcp_idle_timeout,
        ));
        tracing::info!(%udp_addr, %tcp_addr, domain = %config.domain, "serving DNS");
        Ok(DnsServer {
            udp_addr,
            tcp_addr,
            udp_server,
            tcp_task,
        })
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops serving and waits for the UDP task to end.
    pub async fn shutdown(mut self) {
        self.tcp_task.abort();
        if let Err(error) = self.udp_server.shutdown_gracefully().await {
            tracing::warn!(%error, "DNS server stopped with an error");
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.tcp_task.abort();
        self.udp_server.shutdown_token().cancel();
    }
}

fn origin_of(domain: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidConfig {
        field: "domain",
        reason,
    };
    if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
        return Err(invalid(format!("{domain:?} must be a name like \"keel\" or \"consul.example\", without dots at the ends")));
    }
    Name::from_ascii(format!("{domain}."))
        .map_err(|error| invalid(format!("{domain:?} is not a DNS name: {error}")))
}

/// Accepts TCP connections while a permit is free; each connection is served
/// by its own task, one request at a time (hickory's framing and timeout).
async fn serve_tcp(
    listener: TcpListener,
    handler: DnsHandler,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(%error, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS TCP connection refused: too many connections");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let _permit = permit;
            let (messages, stream_handle) = DnsTcpStream::from_stream_with_buffer_size(
                AsyncIoTokioAsStd(stream),
                peer,
                TCP_RESPONSES_QUEUED_MAX,
            );
            let mut messages = TimeoutStream::new(messages, idle_timeout);
            while let Some(message) = messages.next().await {
                let Ok(message) = message else { return };
                let (bytes, source) = message.into_parts();
                let Ok(request) = Request::from_bytes(bytes, source, Protocol::Tcp) else {
                    tracing::debug!(%peer, "malformed DNS request over TCP; closing");
                    return;
                };
                let response_handle =
                    ResponseHandle::new(source, stream_handle.clone(), Protocol::Tcp);
                handler
                    .handle_request::<_, TokioTime>(&request, response_handle)
                    .await;
            }
        });
    }
}

#[derive(Clone)]
struct DnsHandler {
    catalog: Arc<dyn Catalog>,
    origin: Arc<Name>,
    domain_labels: Arc<[String]>,
    ttl_seconds: u32,
    answers_max: usize,
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let response_edns = request.edns.as_ref().map(|request_edns| {
            let mut edns = Edns::new();
            edns.set_max_payload(request_edns.max_payload().max(512));
            edns
        });
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
        let queries = request.queries.queries();
        let result = if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            metadata.response_code = ResponseCode::NotImp;
            response_handle
                .send_response(builder.build_no_records(metadata))
                .await
        } else if queries.len() != 1 {
            metadata.response_code = ResponseCode::FormErr;
            response_handle
                .send_response(builder.build_no_records(metadata))
                .await
        } else {
            let query = &queries[0];
            let name = Name::from(query.name());
            let answer = answer(
                &*self.catalog,
                &self.domain_labels,
                &self.origin,
                &name,
                query.query_type(),
                self.ttl_seconds,
                self.answers_max,
                &mut rand::thread_rng(),
            );
            metadata.response_code = answer.response_code;
            response_handle
                .send_response(builder.build(
                    metadata,
                    answer.answers.iter(),
                    [],
                    [],
                    answer.additionals.iter(),
                ))
                .await
        };
        match result {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "could not send a DNS response");
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// What a query name means.
#[derive(Debug, PartialEq, Eq)]
enum QueryName {
    Service {
        name: String,
        tag: Option<String>,
    },
    Node(String),
    Address(IpAddr),
    /// In the domain, but names nothing we serve.
    Unknown,
    /// Not in the domain.
    Outside,
}

/// Parses `name` (labels lowercased by the caller) against the domain's labels.
fn parse_name(labels: &[String], domain_labels: &[String]) -> QueryName {
    if labels.len() < domain_labels.len()
        || labels[labels.len() - domain_labels.len()..] != *domain_labels
    {
        return QueryName::Outside;
    }
    let inside = &labels[..labels.len() - domain_labels.len()];
    match inside {
        [name, kind] if kind == "service" => QueryName::Service {
            name: name.clone(),
            tag: None,
        },
        [tag, name, kind] if kind == "service" => QueryName::Service {
            name: name.clone(),
            tag: Some(tag.clone()),
        },
        [node, kind] if kind == "node" => QueryName::Node(node.clone()),
        [hex, kind] if kind == "addr" => {
            decode_address(hex).map_or(QueryName::Unknown, QueryName::Address)
        }
        _ => QueryName::Unknown,
    }
}

/// Consul's `.addr.` label: an IPv4 address as 8 hex digits, IPv6 as 32.
fn encode_address(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

fn decode_address(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|bits| IpAddr::V4(Ipv4Addr::from(bits))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|bits| IpAddr::V6(Ipv6Addr::from(bits))),
        _ => None,
    }
}

/// A response's code and records.
#[derive(Debug, PartialEq)]
struct Answer {
    response_code: ResponseCode,
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

impl Answer {
    fn code(response_code: ResponseCode) -> Answer {
        Answer {
            response_code,
            answers: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// Answers one question. Pure but for the catalog and the random order.
#[allow(clippy::too_many_arguments)]
fn answer(
    catalog: &dyn Catalog,
    domain_labels: &[String],
    origin: &Name,
    name: &Name,
    query_type: RecordType,
    ttl_seconds: u32,
    answers_max: usize,
    rng: &mut impl Rng,
) -> Answer {
    let labels: Vec<String> = name
        .iter()
        .map(|label| String::from_utf8_lossy(label).to_ascii_lowercase())
        .collect();
    let address_record = |owner: &Name, address: IpAddr| match address {
        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), ttl_seconds, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(owner.clone(), ttl_seconds, RData::AAAA(AAAA(v6))),
    };
    let wants_address = |address: &IpAddr| match query_type {
        RecordType::A => address.is_ipv4(),
        RecordType::AAAA => address.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    };
    match parse_name(&labels, domain_labels) {
        QueryName::Outside => Answer::code(ResponseCode::Refused),
        QueryName::Unknown => Answer::code(ResponseCode::NXDomain),
        QueryName::Address(address) => {
            let mut answer = Answer::code(ResponseCode::NoError);
            if wants_address(&address) {
                answer.answers.push(address_record(name, address));
            }
            answer
        }
        QueryName::Node(node) => match catalog.node_address(&node) {
            None => Answer::code(ResponseCode::NXDomain),
            Some(address) => {
                let mut answer = Answer::code(ResponseCode::NoError);
                if wants_address(&address) {
                    answer.answers.push(address_record(name, address));
                }
                answer
            }
        },
        QueryName::Service { name: service, tag } => {
            let instances = catalog.passing_instances(&service, tag.as_deref());
            if instances.is_empty() {
                return Answer::code(ResponseCode::NXDomain);
            }
            let mut answer = Answer::code(ResponseCode::NoError);
            let ordered = weighted_order(instances, rng);
            match query_type {
                RecordType::SRV => {
                    for instance in ordered.iter().take(answers_max) {
                        let target = srv_target(catalog, origin, instance);
                        answer.answers.push(Record::from_rdata(
                            name.clone(),
                            ttl_seconds,
                            RData::SRV(SRV::new(
                                1,
                                instance.weight.min(u32::from(u16::MAX)) as u16,
                                instance.port,
                                target.clone(),
                            )),
                        ));
                        if !answer
                            .additionals
                            .iter()
                            .any(|record| record.name == target)
                        {
                            answer
                                .additionals
                                .push(address_record(&target, instance.address));
                        }
                    }
                }
                _ => {
                    // One address record per address: two instances on one
                    // host differ only by port, which A cannot say.
                    let mut addresses: Vec<IpAddr> = Vec::new();
                    for instance in &ordered {
                        if wants_address(&instance.address)
                            && !addresses.contains(&instance.address)
                        {
                            addresses.push(instance.address);
                        }
                    }
                    answer.answers.extend(
                        addresses
                            .into_iter()
                            .take(answers_max)
                            .map(|address| address_record(name, address)),
                    );
                }
            }
            answer
        }
    }
}

/// `<node>.node.<domain>` when the instance listens on its node's address
/// (so the target's A record is the node's), else `<hex>.addr.<domain>`.
fn srv_target(catalog: &dyn Catalog, origin: &Name, instance: &DnsInstance) -> Name {
    let node_name = Name::from_ascii(format!("{}.node", instance.node))
        .ok()
        .and_then(|name| name.append_domain(origin).ok());
    match node_name {
        Some(node_name)
            if catalog
                .node_address(&instance.node)
                .is_none_or(|address| address == instance.address) =>
        {
            node_name
        }
        _ => Name::from_ascii(format!("{}.addr", encode_address(instance.address)))
            .and_then(|name| name.append_domain(origin))
            .expect("hex digits under a valid origin make a valid name"),
    }
}

/// Orders instances at random, each next one drawn with probability
/// proportional to its weight (Efraimidis and Spirakis' weighted sampling
/// without replacement: sort by `u^(1/weight)`, descending). Weight 0 goes
/// last.
fn weighted_order(instances: Vec<DnsInstance>, rng: &mut impl Rng) -> Vec<DnsInstance> {
    let mut keyed: Vec<(f64, DnsInstance)> = instances
        .into_iter()
        .map(|instance| {
            let key = if instance.weight == 0 {
                -1.0
            } else {
                let uniform: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                uniform.powf(1.0 / f64::from(instance.weight))
            };
            (key, instance)
        })
        .collect();
    keyed.sort_by(|(left, _), (right, _)| right.total_cmp(left));
    keyed.into_iter().map(|(_, instance)| instance).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    struct FakeCatalog {
        services: HashMap<(String, Option<String>), Vec<DnsInstance>>,
        nodes: HashMap<String, IpAddr>,
    }

    impl Catalog for FakeCatalog {
        fn passing_instances(&self, service: &str, tag: Option<&str>) -> Vec<DnsInstance> {
            self.services
                .get(&(service.to_string(), tag.map(str::to_string)))
                .cloned()
                .unwrap_or_default()
        }
        fn node_address(&self, node: &str) -> Option<IpAddr> {
            self.nodes.get(node).copied()
        }
    }

    fn instance(node: &str, address: &str, port: u16, weight: u32) -> DnsInstance {
        DnsInstance {
            node: node.into(),
            address: address.parse().unwrap(),
            port,
            weight,
        }
    }

    fn catalog() -> FakeCatalog {
        let web = vec![
            instance("n1", "127.0.0.1", 8001, 1),
            instance("n2", "127.0.0.2", 8002, 1),
            instance("n2", "10.0.0.9", 8003, 1),
        ];
        FakeCatalog {
            services: HashMap::from([
                (("web".to_string(), None), web.clone()),
                (
                    ("web".to_string(), Some("v2".to_string())),
                    web[..1].to_vec(),
                ),
            ]),
            nodes: HashMap::from([
                ("n1".to_string(), "127.0.0.1".parse().unwrap()),
                ("n2".to_string(), "127.0.0.2".parse().unwrap()),
            ]),
        }
    }

    fn ask(catalog: &FakeCatalog, name: &str, query_type: RecordType) -> Answer {
        let domain_labels = vec!["keel".to_string()];
        let origin = origin_of("keel").unwrap();
        answer(
            catalog,
            &domain_labels,
            &origin,
            &Name::from_ascii(name).unwrap(),
            query_type,
            0,
            DEFAULT_ANSWERS_MAX,
            &mut rand::rngs::StdRng::seed_from_u64(7),
        )
    }

    #[test]
    fn names_are_parsed_against_the_domain() {
        let labels = |name: &str| name.split('.').map(str::to_string).collect::<Vec<_>>();
        let domain = labels("consul.example");
        assert_eq!(
            parse_name(&labels("web.service.consul.example"), &domain),
            QueryName::Service {
                name: "web".into(),
                tag: None
            }
        );
        assert_eq!(
            parse_name(&labels("v2.web.service.consul.example"), &domain),
            QueryName::Service {
                name: "web".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            parse_name(&labels("n1.node.consul.example"), &domain),
            QueryName::Node("n1".into())
        );
        assert_eq!(
            parse_name(&labels("7f000001.addr.consul.example"), &domain),
            QueryName::Address("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_name(&labels("zz.addr.consul.example"), &domain),
            QueryName::Unknown
        );
        assert_eq!(
            parse_name(&labels("a.b.c.service.consul.example"), &domain),
            QueryName::Unknown
        );
        assert_eq!(
            parse_name(&labels("consul.example"), &domain),
            QueryName::Unknown
        );
        assert_eq!(
            parse_name(&labels("web.service.example"), &domain),
            QueryName::Outside
        );
        assert_eq!(parse_name(&labels("example"), &domain), QueryName::Outside);
    }

    #[test]
    fn addresses_round_trip_through_addr_labels() {
        for address in ["127.0.0.1", "10.1.2.3", "::1", "fd00::17"] {
            let address: IpAddr = address.parse().unwrap();
            assert_eq!(decode_address(&encode_address(address)), Some(address));
        }
    }

    #[test]
    fn service_a_answers_one_record_per_address() {
        let answer = ask(&catalog(), "WEB.service.keel.", RecordType::A);
        assert_eq!(answer.response_code, ResponseCode::NoError);
        let mut addresses: Vec<String> = answer
            .answers
            .iter()
            .map(|record| record.data.to_string())
            .collect();
        addresses.sort();
        assert_eq!(addresses, vec!["10.0.0.9", "127.0.0.1", "127.0.0.2"]);
        assert!(answer.additionals.is_empty());
        assert!(answer.answers.iter().all(|record| record.ttl == 0));
    }

    #[test]
    fn service_srv_targets_nodes_or_addresses_with_additional_records() {
        let answer = ask(&catalog(), "web.service.keel.", RecordType::SRV);
        assert_eq!(answer.answers.len(), 3);
        let mut targets: Vec<(String, u16)> = answer
            .answers
            .iter()
            .map(|record| match &record.data {
                RData::SRV(srv) => (srv.target.to_string(), srv.port),
                other => panic!("not SRV: {other:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            vec![
                ("0a000009.addr.keel.".to_string(), 8003),
                ("n1.node.keel.".to_string(), 8001),
                ("n2.node.keel.".to_string(), 8002),
            ]
        );
        let mut additionals: Vec<(String, String)> = answer
            .additionals
            .iter()
            .map(|record| (record.name.to_string(), record.data.to_string()))
            .collect();
        additionals.sort();
        assert_eq!(
            additionals,
            vec![
                ("0a000009.addr.keel.".to_string(), "10.0.0.9".to_string()),
                ("n1.node.keel.".to_string(), "127.0.0.1".to_string()),
                ("n2.node.keel.".to_string(), "127.0.0.2".to_string()),
            ]
        );
        let tagged = ask(&catalog(), "v2.web.service.keel.", RecordType::SRV);
        assert_eq!(tagged.answers.len(), 1);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_foreign_names_refused() {
        assert_eq!(
            ask(&catalog(), "db.service.keel.", RecordType::A).response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&catalog(), "v9.web.service.keel.", RecordType::SRV).response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&catalog(), "n9.node.keel.", RecordType::A).response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&catalog(), "what.keel.", RecordType::A).response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&catalog(), "example.com.", RecordType::A).response_code,
            ResponseCode::Refused
        );
        let node = ask(&catalog(), "n1.node.keel.", RecordType::A);
        assert_eq!(
            (node.response_code, node.answers[0].data.to_string()),
            (ResponseCode::NoError, "127.0.0.1".to_string())
        );
        // A known name without records of the type asked: NOERROR, empty.
        let node_aaaa = ask(&catalog(), "n1.node.keel.", RecordType::AAAA);
        assert_eq!(
            (node_aaaa.response_code, node_aaaa.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn answers_are_limited() {
        let many: Vec<DnsInstance> = (0..40)
            .map(|index| instance(&format!("n{index}"), &format!("127.0.1.{index}"), 9000, 1))
            .collect();
        let catalog = FakeCatalog {
            services: HashMap::from([(("big".to_string(), None), many)]),
            nodes: HashMap::new(),
        };
        assert_eq!(
            ask(&catalog, "big.service.keel.", RecordType::SRV)
                .answers
                .len(),
            DEFAULT_ANSWERS_MAX
        );
        assert_eq!(
            ask(&catalog, "big.service.keel.", RecordType::A)
                .answers
                .len(),
            DEFAULT_ANSWERS_MAX
        );
    }

    #[test]
    fn weighted_order_puts_heavier_instances_first_proportionally() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let instances = vec![
            instance("heavy", "127.0.0.1", 1, 3),
            instance("light", "127.0.0.2", 2, 1),
            instance("never", "127.0.0.3", 3, 0),
        ];
        let rounds = 20_000;
        let mut heavy_first = 0;
        for _ in 0..rounds {
            let ordered = weighted_order(instances.clone(), &mut rng);
            assert_eq!(ordered[2].node, "never", "weight 0 goes last");
            if ordered[0].node == "heavy" {
                heavy_first += 1;
            }
        }
        // Expected 3/4 of the rounds; five standard deviations is ±0.015.
        let share = f64::from(heavy_first) / f64::from(rounds);
        assert!(
            (share - 0.75).abs() < 0.015,
            "heavy first in {share} of rounds"
        );
    }

    #[tokio::test]
    async fn a_taken_dns_port_is_an_error_naming_protocol_and_address() {
        let addr: SocketAddr = "127.0.0.1:26404".parse().unwrap();
        let _first = DnsServer::start(DnsConfig::new(addr), Arc::new(catalog()))
            .await
            .unwrap();
        match DnsServer::start(DnsConfig::new(addr), Arc::new(catalog())).await {
            Err(DnsError::Bind {
                protocol,
                addr: reported,
                ..
            }) => {
                assert_eq!((protocol, reported), ("UDP", addr));
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("two servers bound one port"),
        }
        let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
        config.answers_max = 0;
        assert!(matches!(
            DnsServer::start(config, Arc::new(catalog())).await,
            Err(DnsError::InvalidConfig {
                field: "answers_max",
                ..
            })
        ));
    }

    #[test]
    fn bad_domains_are_refused() {
        for domain in ["", ".keel", "keel.", "a..b"] {
            assert!(
                matches!(
                    origin_of(domain),
                    Err(DnsError::InvalidConfig {
                        field: "domain",
                        ..
                    })
                ),
                "{domain:?}"
            );
        }
        assert!(origin_of("consul.example").is_ok());
    }
}
