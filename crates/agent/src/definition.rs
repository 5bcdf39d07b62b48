//! Service and check definitions: parsing and validation.
//!
//! A definition arrives as TOML (a file in `--config-dir`, `keel service
//! register FILE`) or as Consul's JSON (`PUT /v1/agent/service/register`).
//! Consul decodes field names without regard to case (its clients send both
//! `Name` and `name`), so both forms are reduced to one shape first: the keys
//! of the service, check and weights objects are lower-cased with `_` removed
//! (`success_before_passing`, `SuccessBeforePassing` →
//! `successbeforepassing`); the user's own maps (`meta`, `header`) keep their
//! keys. The result is validated as a whole: the first bad field is named with
//! the reason, and nothing of a refused definition is registered.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::check_state::{CheckKind, CheckStatus, Thresholds};

/// Longest service name, instance id, check id or node name, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Most tags on one service.
pub const TAGS_MAX: usize = 64;
/// Longest tag, in bytes.
pub const TAG_BYTES_MAX: usize = 128;
/// Most meta pairs on one service (Consul's limit).
pub const META_PAIRS_MAX: usize = 64;
/// Longest meta key (Consul's limit).
pub const META_KEY_BYTES_MAX: usize = 128;
/// Longest meta value (Consul's limit).
pub const META_VALUE_BYTES_MAX: usize = 512;
/// Most checks on one service.
pub const CHECKS_PER_SERVICE_MAX: usize = 32;
/// Most headers (name and value pairs) on one HTTP check.
pub const HEADERS_MAX: usize = 32;
/// Largest HTTP check request body.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// Most arguments of an exec check.
pub const ARGUMENTS_MAX: usize = 64;
/// Default bound on captured check output (Consul's `OutputMaxSize` default).
pub const OUTPUT_BYTES_DEFAULT: usize = 4096;
/// Largest `output_max_size` a definition may ask for.
pub const OUTPUT_BYTES_MAX: usize = 64 * 1024;
/// Shortest check interval: faster probing costs more than it tells.
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Default check timeout (Consul's).
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest serialized definition accepted from a file or a request.
pub const DEFINITION_BYTES_MAX: usize = 256 * 1024;

/// A definition refused, naming the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service definition: {field}: {reason}")]
pub struct DefinitionError {
    /// The field's path, such as `checks[1].interval`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl DefinitionError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> DefinitionError {
        DefinitionError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Relative weights of an instance in DNS answers (Consul's `Weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Weights {
    #[serde(rename = "Passing")]
    pub passing: u32,
    #[serde(rename = "Warning")]
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Weights {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// A validated service instance definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDefinition {
    /// The instance id, unique on its agent (defaults to the name).
    pub id: String,
    /// The service name discovery looks up.
    pub name: String,
    /// Where the instance listens; empty means the node's address.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub checks: Vec<CheckDefinition>,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An HTTP request: 2xx is passing, 429 warning, anything else critical.
    Http {
        url: String,
        method: String,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A TCP connection to `host:port`.
    Tcp { address: String },
    /// grpc.health.v1 Check against `host:port`, for `service` (empty: the server).
    Grpc { address: String, service: String },
    /// A command: exit 0 passing, 1 warning, anything else critical.
    Exec { arguments: Vec<String> },
    /// The service reports itself through the API within each `ttl`.
    Ttl { ttl: Duration },
}

impl Probe {
    /// Consul's check `Type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Probe::Http { .. } => "http",
            Probe::Tcp { .. } => "tcp",
            Probe::Grpc { .. } => "grpc",
            Probe::Exec { .. } => "script",
            Probe::Ttl { .. } => "ttl",
        }
    }
}

/// A validated check definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDefinition {
    pub id: String,
    pub name: String,
    pub notes: String,
    pub kind: CheckKind,
    pub probe: Probe,
    /// Time between the starts of two runs (unused for TTL checks).
    pub interval: Duration,
    pub timeout: Duration,
    /// Time after registration before the first run.
    pub initial_delay: Duration,
    pub thresholds: Thresholds,
    /// Status before the first result.
    pub initial_status: CheckStatus,
    /// Deregister the service once this check stayed critical this long.
    pub deregister_critical_service_after: Option<Duration>,
    /// Bound on the captured output (HTTP body, command output).
    pub output_max_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    id: Option<String>,
    name: Option<String>,
    address: Option<String>,
    port: Option<u16>,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<RawWeights>,
    check: Option<RawCheck>,
    checks: Option<Vec<RawCheck>>,
    // Consul fields keel accepts and has no use for.
    #[allow(dead_code)]
    enabletagoverride: Option<IgnoredAny>,
    #[allow(dead_code)]
    taggedaddresses: Option<IgnoredAny>,
    #[allow(dead_code)]
    namespace: Option<IgnoredAny>,
    #[allow(dead_code)]
    partition: Option<IgnoredAny>,
    #[allow(dead_code)]
    token: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeights {
    passing: Option<u32>,
    warning: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHeaderValues {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    id: Option<String>,
    checkid: Option<String>,
    name: Option<String>,
    notes: Option<String>,
    kind: Option<String>,
    http: Option<String>,
    method: Option<String>,
    header: Option<BTreeMap<String, RawHeaderValues>>,
    body: Option<String>,
    tcp: Option<String>,
    grpc: Option<String>,
    grpcusetls: Option<bool>,
    args: Option<Vec<String>>,
    ttl: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    initialdelay: Option<String>,
    deregistercriticalserviceafter: Option<String>,
    successbeforepassing: Option<u32>,
    failuresbeforewarning: Option<u32>,
    failuresbeforecritical: Option<u32>,
    status: Option<String>,
    outputmaxsize: Option<usize>,
    serviceid: Option<String>,
    // Consul fields keel accepts and has no use for.
    #[allow(dead_code)]
    tlsskipverify: Option<IgnoredAny>,
    #[allow(dead_code)]
    tlsservername: Option<IgnoredAny>,
}

/// Parses a service definition from Consul's JSON (any key case).
pub fn parse_json(bytes: &[u8]) -> Result<ServiceDefinition, DefinitionError> {
    if bytes.len() > DEFINITION_BYTES_MAX {
        return Err(DefinitionError::new(
            "(body)",
            format!("larger than {DEFINITION_BYTES_MAX} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|error| DefinitionError::new("(body)", format!("not valid JSON: {error}")))?;
    from_value(value)
}

/// Parses a service definition from TOML: the service's fields at the top
/// level (or under a `[service]` table), checks as `[[checks]]`.
pub fn parse_toml(text: &str) -> Result<ServiceDefinition, DefinitionError> {
    if text.len() > DEFINITION_BYTES_MAX {
        return Err(DefinitionError::new(
            "(file)",
            format!("larger than {DEFINITION_BYTES_MAX} bytes"),
        ));
    }
    let table: toml::Table = toml::from_str(text)
        .map_err(|error| DefinitionError::new("(file)", format!("not valid TOML: {error}")))?;
    let mut value = serde_json::to_value(table)
        .map_err(|error| DefinitionError::new("(file)", error.to_string()))?;
    if let Value::Object(object) = &mut value {
        if object.len() == 1 {
            if let Some(Value::Object(service)) = object.remove("service") {
                value = Value::Object(service);
            }
        }
    }
    from_value(value)
}

/// Validates a definition already decoded into a JSON value.
pub fn from_value(value: Value) -> Result<ServiceDefinition, DefinitionError> {
    let Value::Object(object) = value else {
        return Err(DefinitionError::new("(body)", "must be an object"));
    };
    let normalised = normalise_service(object)?;
    let raw: RawService =
        serde_path_to_error::deserialize(Value::Object(normalised)).map_err(|error| {
            let path = error.path().to_string();
            let path = if path == "." {
                "(body)".to_string()
            } else {
                path
            };
            DefinitionError::new(path, error.into_inner().to_string())
        })?;
    validate_service(raw)
}

fn normalise_key(key: &str) -> String {
    key.chars()
        .filter(|character| *character != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn normalise_object(
    object: Map<String, Value>,
    where_: &str,
) -> Result<Map<String, Value>, DefinitionError> {
    let mut normalised = Map::new();
    for (key, value) in object {
        let normal = normalise_key(&key);
        if normalised.insert(normal.clone(), value).is_some() {
            return Err(DefinitionError::new(
                format!("{where_}{key}"),
                format!("given twice (field names ignore case and `_`: {normal})"),
            ));
        }
    }
    Ok(normalised)
}

fn normalise_service(object: Map<String, Value>) -> Result<Map<String, Value>, DefinitionError> {
    let mut service = normalise_object(object, "")?;
    if let Some(Value::Object(weights)) = service.remove("weights") {
        service.insert(
            "weights".into(),
            Value::Object(normalise_object(weights, "weights.")?),
        );
    }
    if let Some(Value::Object(check)) = service.remove("check") {
        service.insert(
            "check".into(),
            Value::Object(normalise_object(check, "check.")?),
        );
    }
    if let Some(Value::Array(checks)) = service.remove("checks") {
        let mut normalised = Vec::with_capacity(checks.len());
        for (index, check) in checks.into_iter().enumerate() {
            normalised.push(match check {
                Value::Object(check) => {
                    Value::Object(normalise_object(check, &format!("checks[{index}]."))?)
                }
                other => other,
            });
        }
        service.insert("checks".into(), Value::Array(normalised));
    }
    Ok(service)
}

/// Checks a name used in store keys, URLs and DNS labels: letters, digits,
/// `-` and `_` (and `.` and `:` where `extra` allows them).
fn validate_name(field: &str, name: &str, extra: &[char]) -> Result<(), DefinitionError> {
    if name.is_empty() {
        return Err(DefinitionError::new(field, "must not be empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(DefinitionError::new(
            field,
            format!("longer than {NAME_BYTES_MAX} bytes"),
        ));
    }
    if let Some(bad) = name.chars().find(|character| {
        !(character.is_ascii_alphanumeric()
            || *character == '-'
            || *character == '_'
            || extra.contains(character))
    }) {
        let allowed: String = extra.iter().map(|c| format!(" `{c}`")).collect();
        return Err(DefinitionError::new(
            field,
            format!("{name:?} contains {bad:?}; allowed are letters, digits, `-`, `_`{allowed}"),
        ));
    }
    Ok(())
}

/// Checks a node name: it is a DNS label (`<node>.node.<domain>`) and part
/// of instance keys, so letters, digits, `-` and `_` only.
pub fn validate_node_name(name: &str) -> Result<(), DefinitionError> {
    validate_name("name", name, &[])
}

fn validate_service(raw: RawService) -> Result<ServiceDefinition, DefinitionError> {
    let name = raw
        .name
        .ok_or_else(|| DefinitionError::new("name", "missing"))?;
    validate_name("name", &name, &[])?;
    let id = raw.id.filter(|id| !id.is_empty()).unwrap_or(name.clone());
    validate_name("id", &id, &['.', ':'])?;
    let address = raw.address.unwrap_or_default();
    if address.len() > 255 || address.contains(['/', ' ']) {
        return Err(DefinitionError::new(
            "address",
            format!("{address:?} is not a host name or IP address"),
        ));
    }
    let tags = raw.tags.unwrap_or_default();
    if tags.len() > TAGS_MAX {
        return Err(DefinitionError::new(
            "tags",
            format!("more than {TAGS_MAX} tags"),
        ));
    }
    for (index, tag) in tags.iter().enumerate() {
        validate_name(&format!("tags[{index}]"), tag, &['.', ':', '='])?;
        if tag.len() > TAG_BYTES_MAX {
            return Err(DefinitionError::new(
                format!("tags[{index}]"),
                format!("longer than {TAG_BYTES_MAX} bytes"),
            ));
        }
    }
    let meta = raw.meta.unwrap_or_default();
    if meta.len() > META_PAIRS_MAX {
        return Err(DefinitionError::new(
            "meta",
            format!("more than {META_PAIRS_MAX} pairs"),
        ));
    }
    for (key, value) in &meta {
        if key.is_empty() || key.len() > META_KEY_BYTES_MAX {
            return Err(DefinitionError::new(
                format!("meta.{key}"),
                format!("a key must have 1 to {META_KEY_BYTES_MAX} bytes"),
            ));
        }
        if value.len() > META_VALUE_BYTES_MAX {
            return Err(DefinitionError::new(
                format!("meta.{key}"),
                format!("value longer than {META_VALUE_BYTES_MAX} bytes"),
            ));
        }
    }
    let weights = match raw.weights {
        None => Weights::default(),
        Some(weights) => {
            let weights = Weights {
                passing: weights.passing.unwrap_or(1),
                warning: weights.warning.unwrap_or(1),
            };
            if weights.passing == 0 {
                return Err(DefinitionError::new(
                    "weights.passing",
                    "must be at least 1",
                ));
            }
            weights
        }
    };
    let mut raw_checks: Vec<(String, RawCheck)> = Vec::new();
    let several = raw.check.is_some() as usize + raw.checks.as_ref().map_or(0, Vec::len) > 1;
    if let Some(check) = raw.check {
        raw_checks.push(("check".into(), check));
    }
    for (index, check) in raw.checks.unwrap_or_default().into_iter().enumerate() {
        raw_checks.push((format!("checks[{index}]"), check));
    }
    if raw_checks.len() > CHECKS_PER_SERVICE_MAX {
        return Err(DefinitionError::new(
            "checks",
            format!("more than {CHECKS_PER_SERVICE_MAX} checks"),
        ));
    }
    let mut checks: Vec<CheckDefinition> = Vec::with_capacity(raw_checks.len());
    for (position, (field, raw_check)) in raw_checks.into_iter().enumerate() {
        // Consul's default check ids: `service:<id>`, numbered when several.
        let default_id = if several {
            format!("service:{id}:{}", position + 1)
        } else {
            format!("service:{id}")
        };
        let check = validate_check(&field, raw_check, &id, &name, default_id)?;
        if checks.iter().any(|other| other.id == check.id) {
            return Err(DefinitionError::new(
                format!("{field}.id"),
                format!("{:?} is used by another check of this service", check.id),
            ));
        }
        checks.push(check);
    }
    Ok(ServiceDefinition {
        id,
        name,
        address,
        port: raw.port.unwrap_or(0),
        tags,
        meta,
        weights,
        checks,
    })
}

fn validate_check(
    field: &str,
    raw: RawCheck,
    service_id: &str,
    service_name: &str,
    default_id: String,
) -> Result<CheckDefinition, DefinitionError> {
    let at = |name: &str| format!("{field}.{name}");
    if let Some(given) = &raw.serviceid {
        if given != service_id {
            return Err(DefinitionError::new(
                at("service_id"),
                format!("{given:?} is not this service's id {service_id:?}"),
            ));
        }
    }
    let id = raw
        .id
        .or(raw.checkid)
        .filter(|id| !id.is_empty())
        .unwrap_or(default_id);
    validate_name(&at("id"), &id, &['.', ':'])?;
    let name = raw
        .name
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("Service '{service_name}' check"));
    let kind = match raw.kind.as_deref() {
        None | Some("readiness") => CheckKind::Readiness,
        Some("liveness") => CheckKind::Liveness,
        Some("startup") => CheckKind::Startup,
        Some(other) => {
            return Err(DefinitionError::new(
                at("kind"),
                format!("{other:?} is not one of readiness, liveness, startup"),
            ))
        }
    };
    let given: Vec<&str> = [
        ("http", raw.http.is_some()),
        ("tcp", raw.tcp.is_some()),
        ("grpc", raw.grpc.is_some()),
        ("args", raw.args.is_some()),
        ("ttl", raw.ttl.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if given.len() != 1 {
        return Err(DefinitionError::new(
            field,
            format!(
                "needs exactly one of http, tcp, grpc, args, ttl (given: {})",
                if given.is_empty() {
                    "none".to_string()
                } else {
                    given.join(", ")
                }
            ),
        ));
    }
    let probe = if let Some(url) = raw.http {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|error| DefinitionError::new(at("http"), format!("{url:?}: {error}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(DefinitionError::new(
                at("http"),
                format!("{url:?} must be an http:// URL with a host (https is not supported)"),
            ));
        }
        let method = raw.method.unwrap_or_else(|| "GET".into()).to_uppercase();
        if hyper::Method::from_bytes(method.as_bytes()).is_err() {
            return Err(DefinitionError::new(
                at("method"),
                format!("{method:?} is not an HTTP method"),
            ));
        }
        let mut headers = Vec::new();
        for (header, values) in raw.header.unwrap_or_default() {
            let values = match values {
                RawHeaderValues::One(value) => vec![value],
                RawHeaderValues::Many(values) => values,
            };
            for value in values {
                if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err()
                    || hyper::header::HeaderValue::from_str(&value).is_err()
                {
                    return Err(DefinitionError::new(
                        format!("{field}.header.{header}"),
                        "not a valid HTTP header name and value",
                    ));
                }
                headers.push((header.clone(), value));
            }
        }
        if headers.len() > HEADERS_MAX {
            return Err(DefinitionError::new(
                at("header"),
                format!("more than {HEADERS_MAX} headers"),
            ));
        }
        let body = raw.body.unwrap_or_default();
        if body.len() > REQUEST_BODY_BYTES_MAX {
            return Err(DefinitionError::new(
                at("body"),
                format!("longer than {REQUEST_BODY_BYTES_MAX} bytes"),
            ));
        }
        Probe::Http {
            url,
            method,
            headers,
            body,
        }
    } else if let Some(address) = raw.tcp {
        validate_host_port(&at("tcp"), &address)?;
        Probe::Tcp { address }
    } else if let Some(target) = raw.grpc {
        if raw.grpcusetls == Some(true) {
            return Err(DefinitionError::new(
                at("grpc_use_tls"),
                "TLS for gRPC checks is not supported",
            ));
        }
        let (address, service) = match target.split_once('/') {
            Some((address, service)) => (address.to_string(), service.to_string()),
            None => (target.clone(), String::new()),
        };
        validate_host_port(&at("grpc"), &address)?;
        Probe::Grpc { address, service }
    } else if let Some(arguments) = raw.args {
        if arguments.is_empty() || arguments[0].is_empty() {
            return Err(DefinitionError::new(at("args"), "must name a command"));
        }
        if arguments.len() > ARGUMENTS_MAX {
            return Err(DefinitionError::new(
                at("args"),
                format!("more than {ARGUMENTS_MAX} arguments"),
            ));
        }
        Probe::Exec { arguments }
    } else {
        let text = raw.ttl.unwrap_or_default();
        let ttl =
            parse_duration(&text).map_err(|reason| DefinitionError::new(at("ttl"), reason))?;
        if ttl < INTERVAL_MIN {
            return Err(DefinitionError::new(
                at("ttl"),
                format!("shorter than {INTERVAL_MIN:?}"),
            ));
        }
        Probe::Ttl { ttl }
    };
    let duration_of = |name: &str, text: Option<String>| -> Result<Option<Duration>, _> {
        text.map(|text| {
            parse_duration(&text).map_err(|reason| DefinitionError::new(at(name), reason))
        })
        .transpose()
    };
    let interval = duration_of("interval", raw.interval)?;
    let interval = match (&probe, interval) {
        (Probe::Ttl { ttl }, None) => *ttl,
        (Probe::Ttl { ttl }, Some(_)) => *ttl,
        (_, None) => {
            return Err(DefinitionError::new(
                at("interval"),
                format!("missing: required for a {} check", probe.type_name()),
            ))
        }
        (_, Some(interval)) if interval < INTERVAL_MIN => {
            return Err(DefinitionError::new(
                at("interval"),
                format!("{interval:?} is shorter than {INTERVAL_MIN:?}"),
            ))
        }
        (_, Some(interval)) => interval,
    };
    let timeout = duration_of("timeout", raw.timeout)?.unwrap_or(TIMEOUT_DEFAULT);
    if timeout.is_zero() {
        return Err(DefinitionError::new(at("timeout"), "must be positive"));
    }
    let initial_delay = duration_of("initial_delay", raw.initialdelay)?.unwrap_or_default();
    let deregister_critical_service_after = duration_of(
        "deregister_critical_service_after",
        raw.deregistercriticalserviceafter,
    )?;
    let failures_before_critical = raw.failuresbeforecritical.unwrap_or(0);
    let thresholds = Thresholds {
        success_before_passing: raw.successbeforepassing.unwrap_or(0),
        failures_before_critical,
        failures_before_warning: raw
            .failuresbeforewarning
            .unwrap_or(failures_before_critical),
    };
    if thresholds.failures_before_warning > thresholds.failures_before_critical {
        return Err(DefinitionError::new(
            at("failures_before_warning"),
            format!(
                "{} is more than failures_before_critical ({})",
                thresholds.failures_before_warning, thresholds.failures_before_critical
            ),
        ));
    }
    let initial_status = match raw.status.as_deref() {
        None | Some("") => CheckStatus::Critical,
        Some(text) => CheckStatus::parse(text).ok_or_else(|| {
            DefinitionError::new(
                at("status"),
                format!("{text:?} is not one of passing, warning, critical"),
            )
        })?,
    };
    let output_max_bytes = raw.outputmaxsize.unwrap_or(OUTPUT_BYTES_DEFAULT);
    if output_max_bytes == 0 || output_max_bytes > OUTPUT_BYTES_MAX {
        return Err(DefinitionError::new(
            at("output_max_size"),
            format!("must be between 1 and {OUTPUT_BYTES_MAX} bytes"),
        ));
    }
    Ok(CheckDefinition {
        id,
        name,
        notes: raw.notes.unwrap_or_default(),
        kind,
        probe,
        interval,
        timeout,
        initial_delay,
        thresholds,
        initial_status,
        deregister_critical_service_after,
        output_max_bytes,
    })
}

fn validate_host_port(field: &str, address: &str) -> Result<(), DefinitionError> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(DefinitionError::new(
            field,
            format!("{address:?} is not host:port"),
        )),
    }
}

/// Parses a Go duration ("10s", "1m30s", "250ms", "1.5h"), as Consul's
/// definitions write them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total_seconds = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|character: char| !(character.is_ascii_digit() || character == '.'))
            .unwrap_or(rest.len());
        if number_end == 0 {
            return Err(format!("{text:?} is not a duration such as 10s or 1m30s"));
        }
        let number: f64 = rest[..number_end]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as 10s or 1m30s"))?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|character: char| character.is_ascii_digit() || character == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{text:?} lacks a unit (ns, us, ms, s, m, h)")),
            unit => return Err(format!("{text:?}: unknown unit {unit:?}")),
        };
        total_seconds += number * seconds_per_unit;
        rest = &rest[unit_end..];
    }
    if !total_seconds.is_finite() || total_seconds > 365.0 * 24.0 * 3600.0 {
        return Err(format!("{text:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(total_seconds))
}

/// Formats a duration as Go does for the shapes keel writes back ("10s", "1.5s").
pub fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}ns", duration.as_nanos())
    }
}

impl ServiceDefinition {
    /// The definition in Consul's register shape, which [`parse_json`]
    /// reads back to the same definition (used to persist API registrations).
    pub fn to_register_json(&self) -> Value {
        let checks: Vec<Value> = self.checks.iter().map(CheckDefinition::to_json).collect();
        serde_json::json!({
            "ID": self.id,
            "Name": self.name,
            "Address": self.address,
            "Port": self.port,
            "Tags": self.tags,
            "Meta": self.meta,
            "Weights": self.weights,
            "Checks": checks,
        })
    }
}

impl CheckDefinition {
    fn to_json(&self) -> Value {
        let mut object = serde_json::json!({
            "CheckID": self.id,
            "Name": self.name,
            "Notes": self.notes,
            "Kind": self.kind.as_str(),
            "Timeout": format_duration(self.timeout),
            "InitialDelay": format_duration(self.initial_delay),
            "SuccessBeforePassing": self.thresholds.success_before_passing,
            "FailuresBeforeWarning": self.thresholds.failures_before_warning,
            "FailuresBeforeCritical": self.thresholds.failures_before_critical,
            "Status": self.initial_status.as_str(),
            "OutputMaxSize": self.output_max_bytes,
        });
        let map = object.as_object_mut().expect("an object");
        if let Some(after) = self.deregister_critical_service_after {
            map.insert(
                "DeregisterCriticalServiceAfter".into(),
                format_duration(after).into(),
            );
        }
        match &self.probe {
            Probe::Http {
                url,
                method,
                headers,
                body,
            } => {
                let mut header: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for (name, value) in headers {
                    header.entry(name).or_default().push(value);
                }
                map.insert("HTTP".into(), url.clone().into());
                map.insert("Method".into(), method.clone().into());
                map.insert("Header".into(), serde_json::json!(header));
                map.insert("Body".into(), body.clone().into());
            }
            Probe::Tcp { address } => {
                map.insert("TCP".into(), address.clone().into());
            }
            Probe::Grpc { address, service } => {
                let target = if service.is_empty() {
                    address.clone()
                } else {
                    format!("{address}/{service}")
                };
                map.insert("GRPC".into(), target.into());
            }
            Probe::Exec { arguments } => {
                map.insert("Args".into(), serde_json::json!(arguments));
            }
            Probe::Ttl { ttl } => {
                map.insert("TTL".into(), format_duration(*ttl).into());
            }
        }
        if !matches!(self.probe, Probe::Ttl { .. }) {
            map.insert("Interval".into(), format_duration(self.interval).into());
        }
        object
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB_TOML: &str = r#"
        name = "web"
        id = "web-1"
        port = 8080
        tags = ["primary", "v2"]
        meta = { version = "2.1" }
        weights = { passing = 3, warning = 1 }

        [[checks]]
        http = "http://127.0.0.1:8080/health"
        interval = "1s"
        timeout = "500ms"
        success_before_passing = 2
        failures_before_critical = 3
        header = { Authorization = "Bearer x" }

        [[checks]]
        id = "boot"
        kind = "startup"
        args = ["/bin/true"]
        interval = "200ms"
    "#;

    #[test]
    fn toml_and_consul_json_give_the_same_definition() {
        let from_toml = parse_toml(WEB_TOML).expect("valid TOML");
        let json = br#"{
            "Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["primary", "v2"],
            "Meta": {"version": "2.1"}, "Weights": {"Passing": 3, "Warning": 1},
            "Checks": [
                {"HTTP": "http://127.0.0.1:8080/health", "Interval": "1s", "Timeout": "500ms",
                 "SuccessBeforePassing": 2, "FailuresBeforeCritical": 3,
                 "Header": {"Authorization": ["Bearer x"]}},
                {"CheckID": "boot", "Kind": "startup", "Args": ["/bin/true"], "interval": "200ms"}
            ]}"#;
        let from_json = parse_json(json).expect("valid JSON");
        assert_eq!(from_toml, from_json);
        assert_eq!(from_toml.checks[0].id, "service:web-1:1");
        assert_eq!(from_toml.checks[0].thresholds.failures_before_warning, 3);
        assert_eq!(from_toml.checks[1].kind, CheckKind::Startup);
        assert_eq!(from_toml.meta["version"], "2.1");
    }

    #[test]
    fn the_register_shape_reads_back_to_the_same_definition() {
        let definition = parse_toml(WEB_TOML).expect("valid");
        let bytes = serde_json::to_vec(&definition.to_register_json()).expect("serialises");
        assert_eq!(parse_json(&bytes).expect("reads back"), definition);
    }

    #[test]
    fn lower_case_consul_clients_are_understood() {
        // python-consul's shape: lower-case keys, a single `check`.
        let definition = parse_json(br#"{"name": "api", "port": 9000, "check": {"ttl": "10s"}}"#)
            .expect("valid");
        assert_eq!(definition.id, "api");
        assert_eq!(definition.checks[0].id, "service:api");
        assert_eq!(
            definition.checks[0].probe,
            Probe::Ttl {
                ttl: Duration::from_secs(10)
            }
        );
    }

    fn refused(json: &str) -> DefinitionError {
        parse_json(json.as_bytes()).expect_err("must be refused")
    }

    #[test]
    fn bad_definitions_are_refused_naming_the_field() {
        assert_eq!(refused(r#"{"Port": 1}"#).field, "name");
        assert_eq!(refused(r#"{"Name": "a/b"}"#).field, "name");
        assert_eq!(refused(r#"{"Name": "web", "Port": 70000}"#).field, "port");
        let error =
            refused(r#"{"Name": "web", "Check": {"HTTP": "http://x:1/", "Interval": "fast"}}"#);
        assert_eq!(error.field, "check.interval");
        let error =
            refused(r#"{"Name": "web", "Checks": [{"TTL": "5s"}, {"HTTP": "http://x:1/"}]}"#);
        assert_eq!(error.field, "checks[1].interval");
        assert!(error.reason.contains("missing"), "{error}");
        let error = refused(
            r#"{"Name": "web", "Check": {"HTTP": "http://x/", "TCP": "x:1", "Interval": "1s"}}"#,
        );
        assert!(error.reason.contains("exactly one"), "{error}");
        let error = refused(r#"{"Name": "web", "Check": {"TCP": "nohost", "Interval": "1s"}}"#);
        assert_eq!(error.field, "check.tcp");
        let error = refused(r#"{"Name": "web", "Colour": "red"}"#);
        assert!(error.reason.contains("unknown field"), "{error}");
        let error = refused(r#"{"Name": "web", "Check": {"TTL": "5s", "Kind": "sometimes"}}"#);
        assert_eq!(error.field, "check.kind");
        let error = refused(
            r#"{"Name": "web", "Check": {"TTL": "5s", "FailuresBeforeWarning": 4, "FailuresBeforeCritical": 2}}"#,
        );
        assert_eq!(error.field, "check.failures_before_warning");
        let error = refused(
            r#"{"Name": "web", "Checks": [{"TTL": "5s", "ID": "a"}, {"TTL": "5s", "ID": "a"}]}"#,
        );
        assert_eq!(error.field, "checks[1].id");
        let error = refused(r#"{"Name": "web", "Tags": "x"}"#);
        assert_eq!(error.field, "tags");
        let error =
            refused(r#"{"Name": "web", "Check": {"HTTP": "https://x:1/", "Interval": "1s"}}"#);
        assert_eq!(error.field, "check.http");
        assert!(parse_toml("name = ").is_err());
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
