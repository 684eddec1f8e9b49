//! What a process's cgroup path says about its workload: the pod and container a Kubernetes
//! node put it in, a container a runtime started outside Kubernetes, or a systemd unit.
//!
//! The layouts read (each component may sit under any prefix, `..` included: a daemon in its
//! own cgroup namespace sees other pods' paths relative to its own cgroup):
//! - kubelet, systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/
//!   <runtime>-<64 hex>.scope` (the UID's `-` written as `_`; guaranteed pods have no `<qos>`);
//! - kubelet, cgroupfs driver: `kubepods/<qos>/pod<uid>/<64 hex>`;
//! - runtimes: `cri-containerd-`, `crio-`, `docker-`, `libpod-` scopes (`crio-conmon-` is the
//!   monitor, not the container); cgroupfs `docker/<64 hex>`;
//! - systemd: the innermost `*.service` component (a server run as a unit), never a user's
//!   service manager (`user@<uid>.service`).

use super::Workload;

/// Reads `/proc/<pid>/cgroup` text. The v2 line (`0::`) comes first; on a hybrid host whose v2
/// tree is empty the v1 lines are tried in turn (the `name=systemd` and controller trees hold
/// the same kubelet layout).
pub fn parse(text: &str) -> Option<Workload> {
    let paths = text.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (Some(h), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        Some((h == "0", path))
    });
    let mut v2: Vec<&str> = Vec::new();
    let mut v1: Vec<&str> = Vec::new();
    for (is_v2, path) in paths {
        if is_v2 { v2.push(path) } else { v1.push(path) }
    }
    v2.into_iter().chain(v1).find_map(from_path)
}

/// The workload one cgroup path names, if any.
pub fn from_path(path: &str) -> Option<Workload> {
    let mut w = Workload::default();
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != "..")
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if let Some(uid) = pod_uid(part) {
            w.pod_uid = Some(uid);
        } else if let Some((runtime, id)) = scope(part) {
            w.runtime = Some(runtime.to_string());
            w.container_id = Some(id.to_string());
        } else if is_container_id(part) && i > 0 && cgroupfs_parent(parts[i - 1]) {
            w.container_id = Some((*part).to_string());
            if parts[i - 1] == "docker" {
                w.runtime = Some("docker".into());
            }
        } else if let Some(unit) = part
            .strip_suffix(".service")
            .filter(|u| !u.is_empty() && !u.starts_with("user@"))
        {
            // `user@1000.service` is a user's service manager, not a server: the innermost
            // other service wins.
            w.unit = Some(format!("{unit}.service"));
        }
    }
    (!w.is_empty()).then_some(w)
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let raw = if let Some(slice) = part.strip_suffix(".slice") {
        // `kubelet-kubepods-…` under kind and some k3s setups.
        let at = slice.find("kubepods")?;
        let (_, uid) = slice[at..].rsplit_once("-pod")?;
        uid
    } else {
        part.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// `<runtime>-<64 hex>.scope`, with the runtime's name as the kubelet reports it
/// (`containerd://`, `cri-o://`, `docker://`).
fn scope(part: &str) -> Option<(&'static str, &str)> {
    let body = part.strip_suffix(".scope")?;
    let (runtime, id) = [
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ]
    .into_iter()
    .find_map(|(prefix, name)| body.strip_prefix(prefix).map(|id| (name, id)))?;
    is_container_id(id).then_some((runtime, id))
}

/// Parents under which a bare 64-hex component is a container (cgroupfs drivers).
fn cgroupfs_parent(parent: &str) -> bool {
    parent == "docker" || parent.starts_with("pod") || parent == "kubepods"
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A UUID as Kubernetes writes it (8-4-4-4-12 hex), or a static pod's 32-hex config hash.
fn is_uid(s: &str) -> bool {
    let hex = |p: &str| p.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    (lens == [8, 4, 4, 4, 12] || lens == [32]) && groups.iter().all(|g| hex(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "4f9c3a1e-7b2d-4c8e-9a01-23456789abcd";

    #[test]
    fn systemd_driver_containerd_burstable() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let w = parse(&format!("0::{path}\n")).expect("a workload");
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.runtime.as_deref(), Some("containerd"));
        assert_eq!(w.unit, None);
    }

    #[test]
    fn systemd_driver_guaranteed_crio_and_its_conmon() {
        let pod = format!(
            "/kubepods.slice/kubepods-pod{}.slice",
            UID.replace('-', "_")
        );
        let w = from_path(&format!("{pod}/crio-{ID}.scope")).expect("a workload");
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.runtime.as_deref(), Some("cri-o"));
        // The monitor process belongs to the pod, but is no container.
        let conmon = from_path(&format!("{pod}/crio-conmon-{ID}.scope")).expect("the pod");
        assert_eq!(conmon.pod_uid.as_deref(), Some(UID));
        assert_eq!(conmon.container_id, None);
    }

    #[test]
    fn cgroupfs_driver_and_a_nested_cgroup_namespace_view() {
        let w = from_path(&format!("/kubepods/besteffort/pod{UID}/{ID}")).expect("a workload");
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        // Seen from a daemon in its own cgroup namespace, with a sub-cgroup the server made.
        let w = from_path(&format!(
            "/../../kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope/worker",
            UID.replace('-', "_")
        ))
        .expect("a workload");
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn containers_outside_kubernetes_and_systemd_units() {
        let w = from_path(&format!("/system.slice/docker-{ID}.scope")).expect("docker");
        assert_eq!((w.runtime.as_deref(), w.pod_uid), (Some("docker"), None));
        let w = from_path(&format!("/docker/{ID}")).expect("docker cgroupfs");
        assert_eq!(w.container_id.as_deref(), Some(ID));
        let w = from_path(&format!("/machine.slice/libpod-{ID}.scope/container")).expect("podman");
        assert_eq!(w.runtime.as_deref(), Some("podman"));
        let w = from_path("/system.slice/ollama.service").expect("a unit");
        assert_eq!(w.unit.as_deref(), Some("ollama.service"));
        let w = from_path("/user.slice/user-1000.slice/user@1000.service/app.slice/vllm.service")
            .expect("a user unit");
        assert_eq!(w.unit.as_deref(), Some("vllm.service"));
        // A terminal's scope under the user's manager is no unit of a server.
        assert_eq!(
            from_path("/user.slice/user-1000.slice/user@1000.service/app.slice/app-term-1.scope"),
            None
        );
    }

    #[test]
    fn nothing_to_say_is_none() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/process_api/aff0eba39210a294ebcf7a86c4751013",
            "/kubepods.slice/kubepods-podnot_a_uid.slice",
            "/docker/abc",
            &format!("/somewhere/{ID}"),
        ] {
            assert_eq!(from_path(path), None, "{path}");
        }
        assert_eq!(parse("garbage\n\n::\n"), None);
    }

    #[test]
    fn hybrid_hosts_fall_back_to_v1_lines() {
        let text = format!(
            "9:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n4:memory:/kubepods/burstable/pod{UID}/{ID}\n0::/\n"
        );
        let w = parse(&text).expect("from the v1 lines");
        assert_eq!(w.container_id.as_deref(), Some(ID));
        // A v2 path that says something wins over the v1 lines.
        let text = format!("1:cpu:/docker/{ID}\n0::/system.slice/tgi.service\n");
        assert_eq!(
            parse(&text).and_then(|w| w.unit).as_deref(),
            Some("tgi.service")
        );
    }
}
