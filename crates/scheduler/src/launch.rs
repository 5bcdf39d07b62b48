//! What the supervisor starts for a task of an allocation: the command, its
//! arguments and environment with keel's variables (Nomad's `NOMAD_*`,
//! renamed `KEEL_*`) and `${NAME}` replaced in the arguments and in the
//! job's own environment values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::Allocation;
use crate::spec::Task;

/// A task ready to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLaunch {
    /// The program.
    pub command: String,
    /// Its arguments, interpolated.
    pub args: Vec<String>,
    /// The environment added to the agent's (keel's variables, then the
    /// task's `env`, interpolated).
    pub env: BTreeMap<String, String>,
    /// The working directory, if the job sets one.
    pub work_dir: Option<String>,
}

/// The launch of `task` (named `task_name`) for `allocation`. Variables:
/// `KEEL_ALLOC_ID`, `KEEL_ALLOC_INDEX`, `KEEL_JOB_NAME`, `KEEL_GROUP_NAME`,
/// `KEEL_TASK_NAME`, `KEEL_CPU_LIMIT` (millicores), `KEEL_MEMORY_LIMIT`
/// (MiB) and `KEEL_PORT_<label>` for every port of the allocation.
/// `${NAME}` of an unknown name is left as written, as Nomad does.
pub fn task_launch(allocation: &Allocation, task_name: &str, task: &Task) -> TaskLaunch {
    let mut env = BTreeMap::from([
        ("KEEL_ALLOC_ID".to_string(), allocation.id.0.clone()),
        ("KEEL_ALLOC_INDEX".to_string(), allocation.index.to_string()),
        ("KEEL_JOB_NAME".to_string(), allocation.job.clone()),
        ("KEEL_GROUP_NAME".to_string(), allocation.group.clone()),
        ("KEEL_TASK_NAME".to_string(), task_name.to_string()),
        (
            "KEEL_CPU_LIMIT".to_string(),
            task.resources.cpu_millicores.to_string(),
        ),
        (
            "KEEL_MEMORY_LIMIT".to_string(),
            task.resources.memory_mib.to_string(),
        ),
    ]);
    for (label, port) in &allocation.ports {
        env.insert(format!("KEEL_PORT_{label}"), port.to_string());
    }
    let keel_variables = env.clone();
    for (key, value) in &task.env {
        env.insert(key.clone(), interpolate(value, &keel_variables));
    }
    TaskLaunch {
        command: interpolate(&task.config.command, &keel_variables),
        args: task
            .config
            .args
            .iter()
            .map(|argument| interpolate(argument, &keel_variables))
            .collect(),
        env,
        work_dir: task
            .config
            .work_dir
            .as_ref()
            .map(|work_dir| interpolate(work_dir, &keel_variables)),
    }
}

/// Replaces each `${NAME}` whose NAME is known.
fn interpolate(text: &str, variables: &BTreeMap<String, String>) -> String {
    let mut result = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        result.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                match variables.get(&after[..end]) {
                    Some(value) => result.push_str(value),
                    None => result.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                result.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    result.push_str(rest);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_replaces_known_names_only() {
        let variables = BTreeMap::from([("KEEL_PORT_http".to_string(), "20001".to_string())]);
        assert_eq!(interpolate("${KEEL_PORT_http}", &variables), "20001");
        assert_eq!(
            interpolate("--listen=:${KEEL_PORT_http}/x", &variables),
            "--listen=:20001/x"
        );
        assert_eq!(
            interpolate("${HOME} ${KEEL_PORT_http}", &variables),
            "${HOME} 20001"
        );
        assert_eq!(interpolate("${unclosed", &variables), "${unclosed");
        assert_eq!(interpolate("plain", &variables), "plain");
    }
}
