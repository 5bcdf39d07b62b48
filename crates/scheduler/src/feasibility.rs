//! Feasibility: which nodes may take an allocation at all. A node is
//! feasible when it is alive, eligible and not draining, satisfies every
//! constraint of the job and group, and has the CPU, memory and ports left
//! after the allocations it already holds. Each refusal is counted by reason,
//! as Nomad's allocation metrics do, so `keel job plan` can say why nothing fit.

use std::collections::BTreeSet;

use regex::Regex;

use crate::cluster::{Node, NodeStatus};
use crate::spec::{Constraint, ConstraintOperator, Resources};

/// A node property named in a constraint or spread: `${meta.<label>}`,
/// `${attr.<name>}` or `${node.unique.name}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeProperty {
    /// A user label.
    Label(String),
    /// A detected attribute.
    Attribute(String),
    /// The node's name.
    Name,
}

impl NodeProperty {
    /// Reads an interpolation such as `${meta.zone}`.
    pub fn parse(text: &str) -> Result<NodeProperty, String> {
        let inner = text
            .strip_prefix("${")
            .and_then(|rest| rest.strip_suffix('}'))
            .ok_or_else(|| format!("{text:?} is not a node property: write ${{meta.<label>}}, ${{attr.<name>}} or ${{node.unique.name}}"))?;
        if inner == "node.unique.name" {
            return Ok(NodeProperty::Name);
        }
        if let Some(label) = inner
            .strip_prefix("meta.")
            .filter(|label| !label.is_empty())
        {
            return Ok(NodeProperty::Label(label.to_string()));
        }
        if let Some(name) = inner.strip_prefix("attr.").filter(|name| !name.is_empty()) {
            return Ok(NodeProperty::Attribute(name.to_string()));
        }
        Err(format!("{text:?} names no known node property: use ${{meta.<label>}}, ${{attr.<name>}} or ${{node.unique.name}}"))
    }

    /// The property's value on a node, if set.
    pub fn value<'node>(&self, node: &'node Node) -> Option<&'node str> {
        match self {
            NodeProperty::Label(label) => node.labels.get(label).map(String::as_str),
            NodeProperty::Attribute(name) => node.attributes.get(name).map(String::as_str),
            NodeProperty::Name => Some(node.name.as_str()),
        }
    }
}

/// A constraint made ready to test many nodes: its property parsed, its
/// regular expression or version requirement compiled once.
#[derive(Clone, Debug)]
pub(crate) struct CompiledConstraint {
    property: NodeProperty,
    test: Test,
    /// How refusals are reported: `${meta.zone} = a`.
    pub(crate) description: String,
}

#[derive(Clone, Debug)]
enum Test {
    Equal(String),
    NotEqual(String),
    Regexp(Regex),
    Semver(semver::VersionReq),
    IsSet,
    IsNotSet,
}

/// What distinct_hosts asks for, if any constraint does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DistinctHosts {
    /// No two allocations of the same job on one node.
    pub(crate) per_job: bool,
    /// No two allocations of the same group on one node.
    pub(crate) per_group: bool,
}

/// Compiles the job's and the group's constraints. Specs are validated
/// first, so a constraint that does not compile is a caller's bug; it is
/// still handled (as a constraint no node satisfies) rather than a panic.
pub(crate) fn compile_constraints(
    job_constraints: &[Constraint],
    group_constraints: &[Constraint],
) -> (Vec<CompiledConstraint>, DistinctHosts) {
    let mut compiled = Vec::new();
    let mut distinct_hosts = DistinctHosts::default();
    for (constraint, job_level) in job_constraints
        .iter()
        .map(|constraint| (constraint, true))
        .chain(
            group_constraints
                .iter()
                .map(|constraint| (constraint, false)),
        )
    {
        if constraint.operator == ConstraintOperator::DistinctHosts {
            if constraint.value != "false" {
                if job_level {
                    distinct_hosts.per_job = true;
                } else {
                    distinct_hosts.per_group = true;
                }
            }
            continue;
        }
        let description = format!(
            "{} {} {}",
            constraint.attribute,
            operator_text(constraint.operator),
            constraint.value
        )
        .trim_end()
        .to_string();
        let property = NodeProperty::parse(&constraint.attribute)
            .unwrap_or(NodeProperty::Attribute(String::new()));
        let test = match constraint.operator {
            ConstraintOperator::Equal => Test::Equal(constraint.value.clone()),
            ConstraintOperator::NotEqual => Test::NotEqual(constraint.value.clone()),
            ConstraintOperator::Regexp => match Regex::new(&constraint.value) {
                Ok(regex) => Test::Regexp(regex),
                Err(_) => Test::IsSet,
            },
            ConstraintOperator::Semver => match semver::VersionReq::parse(&constraint.value) {
                Ok(requirement) => Test::Semver(requirement),
                Err(_) => Test::IsSet,
            },
            ConstraintOperator::IsSet => Test::IsSet,
            ConstraintOperator::IsNotSet => Test::IsNotSet,
            ConstraintOperator::DistinctHosts => unreachable!("handled above"),
        };
        compiled.push(CompiledConstraint {
            property,
            test,
            description,
        });
    }
    (compiled, distinct_hosts)
}

fn operator_text(operator: ConstraintOperator) -> &'static str {
    match operator {
        ConstraintOperator::Equal => "=",
        ConstraintOperator::NotEqual => "!=",
        ConstraintOperator::Regexp => "regexp",
        ConstraintOperator::Semver => "semver",
        ConstraintOperator::IsSet => "is_set",
        ConstraintOperator::IsNotSet => "is_not_set",
        ConstraintOperator::DistinctHosts => "distinct_hosts",
    }
}

impl CompiledConstraint {
    /// Whether the node satisfies the constraint.
    pub(crate) fn allows(&self, node: &Node) -> bool {
        let value = self.property.value(node);
        match &self.test {
            Test::Equal(expected) => value == Some(expected.as_str()),
            Test::NotEqual(expected) => value != Some(expected.as_str()),
            Test::Regexp(regex) => value.is_some_and(|value| regex.is_match(value)),
            Test::Semver(requirement) => value
                .and_then(lenient_version)
                .is_some_and(|version| requirement.matches(&version)),
            Test::IsSet => value.is_some(),
            Test::IsNotSet => value.is_none(),
        }
    }
}

/// Reads `1`, `1.2` or `1.2.3` (with an optional leading `v`) as a version,
/// as node attributes such as kernel versions are often written.
fn lenient_version(text: &str) -> Option<semver::Version> {
    let text = text.strip_prefix('v').unwrap_or(text);
    semver::Version::parse(text)
        .or_else(|_| semver::Version::parse(&format!("{text}.0")))
        .or_else(|_| semver::Version::parse(&format!("{text}.0.0")))
        .ok()
}

/// Why a node cannot take the allocation, or `None` when it can.
pub(crate) fn node_refusal(node: &Node) -> Option<&'static str> {
    match node.status {
        NodeStatus::Down { .. } => Some("node down"),
        NodeStatus::Suspect => Some("node suspect"),
        NodeStatus::Alive if node.drain.is_some() => Some("node draining"),
        NodeStatus::Alive if !node.eligible => Some("node ineligible"),
        NodeStatus::Alive => None,
    }
}

/// Which resource is short, or `None` when `needed` fits in `free`.
pub(crate) fn exhausted_dimension(free: Resources, needed: Resources) -> Option<&'static str> {
    if needed.cpu_millicores > free.cpu_millicores {
        Some("cpu")
    } else if needed.memory_mib > free.memory_mib {
        Some("memory")
    } else {
        None
    }
}

/// Whether the node has the static ports free and enough dynamic ones.
pub(crate) fn ports_available(
    node: &Node,
    used: &BTreeSet<u16>,
    static_ports: &[u16],
    dynamic_count: usize,
) -> Option<&'static str> {
    if static_ports.iter().any(|port| used.contains(port)) {
        return Some("static port in use");
    }
    if dynamic_count == 0 {
        return None;
    }
    let range = node.port_range;
    if range.first > range.last {
        return Some("ports");
    }
    let range_size = usize::from(range.last - range.first) + 1;
    let taken = used.range(range.first..=range.last).count()
        + static_ports
            .iter()
            .filter(|port| (range.first..=range.last).contains(port))
            .count();
    if range_size.saturating_sub(taken) < dynamic_count {
        Some("ports")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::PortRange;
    use std::collections::BTreeMap;

    fn node() -> Node {
        Node {
            name: "n1".into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            attributes: BTreeMap::from([("kernel.version".to_string(), "6.1".to_string())]),
            capacity: Resources {
                cpu_millicores: 1000,
                memory_mib: 1024,
            },
            port_range: PortRange {
                first: 20000,
                last: 20002,
            },
            eligible: true,
            drain: None,
            status: NodeStatus::Alive,
        }
    }

    fn allows(attribute: &str, operator: ConstraintOperator, value: &str) -> bool {
        let constraint = Constraint {
            attribute: attribute.into(),
            operator,
            value: value.into(),
        };
        let (compiled, _) = compile_constraints(&[], &[constraint]);
        compiled[0].allows(&node())
    }

    #[test]
    fn constraint_operators() {
        assert!(allows("${meta.zone}", ConstraintOperator::Equal, "a"));
        assert!(!allows("${meta.zone}", ConstraintOperator::Equal, "b"));
        assert!(allows("${meta.zone}", ConstraintOperator::NotEqual, "b"));
        assert!(
            allows("${meta.rack}", ConstraintOperator::NotEqual, "b"),
            "a missing property differs from any value"
        );
        assert!(!allows("${meta.rack}", ConstraintOperator::Equal, "b"));
        assert!(allows(
            "${node.unique.name}",
            ConstraintOperator::Regexp,
            "^n[0-9]$"
        ));
        assert!(!allows(
            "${node.unique.name}",
            ConstraintOperator::Regexp,
            "^m"
        ));
        assert!(allows(
            "${attr.kernel.version}",
            ConstraintOperator::Semver,
            ">= 5.10, < 7"
        ));
        assert!(!allows(
            "${attr.kernel.version}",
            ConstraintOperator::Semver,
            ">= 6.2"
        ));
        assert!(allows("${meta.zone}", ConstraintOperator::IsSet, ""));
        assert!(allows("${meta.rack}", ConstraintOperator::IsNotSet, ""));
    }

    #[test]
    fn node_properties_parse() {
        assert_eq!(
            NodeProperty::parse("${meta.zone}"),
            Ok(NodeProperty::Label("zone".into()))
        );
        assert_eq!(
            NodeProperty::parse("${attr.cpu.numcores}"),
            Ok(NodeProperty::Attribute("cpu.numcores".into()))
        );
        assert_eq!(
            NodeProperty::parse("${node.unique.name}"),
            Ok(NodeProperty::Name)
        );
        assert!(NodeProperty::parse("meta.zone").is_err());
        assert!(NodeProperty::parse("${meta.}").is_err());
        assert!(NodeProperty::parse("${node.datacenter}").is_err());
    }

    #[test]
    fn node_states_and_resources() {
        let mut down = node();
        down.status = NodeStatus::Down {
            since: crate::Time(0),
        };
        assert_eq!(node_refusal(&down), Some("node down"));
        let mut suspect = node();
        suspect.status = NodeStatus::Suspect;
        assert_eq!(node_refusal(&suspect), Some("node suspect"));
        let mut ineligible = node();
        ineligible.eligible = false;
        assert_eq!(node_refusal(&ineligible), Some("node ineligible"));
        assert_eq!(node_refusal(&node()), None);
        let free = Resources {
            cpu_millicores: 100,
            memory_mib: 100,
        };
        assert_eq!(
            exhausted_dimension(
                free,
                Resources {
                    cpu_millicores: 101,
                    memory_mib: 1
                }
            ),
            Some("cpu")
        );
        assert_eq!(
            exhausted_dimension(
                free,
                Resources {
                    cpu_millicores: 1,
                    memory_mib: 101
                }
            ),
            Some("memory")
        );
        assert_eq!(exhausted_dimension(free, free), None);
    }

    #[test]
    fn ports_fit_in_the_range() {
        let used = BTreeSet::from([20000]);
        assert_eq!(ports_available(&node(), &used, &[], 2), None);
        assert_eq!(ports_available(&node(), &used, &[], 3), Some("ports"));
        assert_eq!(
            ports_available(&node(), &used, &[20000], 0),
            Some("static port in use")
        );
        assert_eq!(ports_available(&node(), &used, &[8080], 2), None);
    }
}
