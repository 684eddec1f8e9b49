//! Workload identity: which pod, container or systemd unit a service runs in, so that records,
//! summaries and metrics name what an operator deploys (a namespace and a pod), not only a pid.
//!
//! Two halves: the cgroup path gives the pod UID, the container id and the runtime
//! ([`cgroup`], pure); the kubelet's pods endpoint gives their names ([`kubelet`], the only
//! network I/O discovery does, cached). Discovery resolves a service's identity from its first
//! root process, then carries it to the pipeline with the service, so a replay sees the same.

pub mod cgroup;
pub mod kubelet;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Where a service runs, as far as the host can tell. Every field is optional: a bare host has
/// none, a systemd unit only `unit`, a container outside Kubernetes no pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Kubernetes namespace (from the kubelet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name (from the kubelet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Container name within the pod (from the kubelet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The pod's UID (from the cgroup path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The container's id, 64 hex digits (from the cgroup path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The runtime that made the container: `containerd`, `cri-o`, `docker`, `podman`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The systemd unit the service runs as (`vllm.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl Workload {
    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Short text for logs and `tracer services`: `ns/pod/container`, else the container id
    /// (12 digits, as runtimes print it), else the unit.
    pub fn text(&self) -> String {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => {
                let mut s = format!("{ns}/{pod}");
                if let Some(c) = &self.container {
                    let _ = write!(s, "/{c}");
                }
                s
            }
            _ => match (&self.pod_uid, &self.container_id, &self.unit) {
                (Some(uid), id, _) => match id {
                    Some(id) => format!("pod {uid}, container {}", short(id)),
                    None => format!("pod {uid}"),
                },
                (None, Some(id), _) => format!(
                    "{} container {}",
                    self.runtime.as_deref().unwrap_or("a"),
                    short(id)
                ),
                (None, None, Some(unit)) => format!("unit {unit}"),
                (None, None, None) => String::new(),
            },
        }
    }

    /// The labels it adds to a per-service metric series: `namespace`, `pod`, `container`
    /// where known (none outside a pod; ids stay out: they would only multiply series).
    pub fn label_pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.clone().map(|v| (name, v)))
        .collect()
    }

    /// [`Self::label_pairs`] as Prometheus text (`,namespace="…",pod="…"`), with `escape`
    /// applied to each value.
    pub fn labels(&self, escape: impl Fn(&str) -> String) -> String {
        let mut s = String::new();
        for (name, v) in self.label_pairs() {
            let _ = write!(s, ",{name}=\"{}\"", escape(&v));
        }
        s
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_labels() {
        let mut w = Workload {
            pod_uid: Some("u".into()),
            container_id: Some("0123456789abcdef".into()),
            runtime: Some("containerd".into()),
            ..Workload::default()
        };
        assert_eq!(w.text(), "pod u, container 0123456789ab");
        assert_eq!(w.labels(str::to_string), "");
        w.namespace = Some("llm".into());
        w.pod = Some("vllm-0".into());
        w.container = Some("engine".into());
        assert_eq!(w.text(), "llm/vllm-0/engine");
        assert_eq!(
            w.labels(str::to_uppercase),
            ",namespace=\"LLM\",pod=\"VLLM-0\",container=\"ENGINE\""
        );
        let unit = Workload {
            unit: Some("tgi.service".into()),
            ..Workload::default()
        };
        assert_eq!(unit.text(), "unit tgi.service");
        assert!(Workload::default().is_empty());
    }
}
