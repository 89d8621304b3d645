//! The lab network: namespaces, veths, bridges, routes (iproute2), partitions (nft) and impairments (tc netem).

use std::fmt::Write as _;
use std::time::Duration;

use crate::cmd;
use crate::error::{LabError, Result};
use crate::plan::{ClusterInfo, LabPlan};
use crate::state::Impairment;

/// nft table (family inet) in the router namespace.
const NFT_TABLE: &str = "meshlab";
/// HTB rate of every class: high enough never to be the bottleneck.
const HTB_RATE: &str = "10gbit";

/// Names of every network namespace on the host (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    Ok(cmd::ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of processes whose network namespace is `netns` (`ip netns pids`); empty when it does not exist.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    cmd::ip(&["netns", "pids", netns])
        .map(|o| o.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Deletes a namespace; one that does not exist is success.
pub fn delete_netns(netns: &str) -> Result<()> {
    match cmd::ip(&["netns", "del", netns]) {
        Ok(_) => Ok(()),
        Err(_) if !std::path::Path::new("/run/netns").join(netns).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when a host interface of that name exists.
pub fn host_link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Creates every namespace, link, address and route of `plan`, the router's nft table, and ip forwarding.
pub fn build(plan: &LabPlan) -> Result<()> {
    for ns in plan.netns_names() {
        cmd::ip(&["netns", "add", &ns])?;
    }
    let r = &plan.router_netns;
    let sup = plan.supernet();
    // host <-> router
    cmd::ip(&[
        "link",
        "add",
        &plan.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "uplink",
        "netns",
        r,
    ])?;
    let mut host = String::new();
    let _ = writeln!(
        host,
        "addr add {}/24 dev {}",
        plan.host_addr, plan.host_veth
    );
    let _ = writeln!(host, "link set {} up", plan.host_veth);
    let _ = writeln!(
        host,
        "route add {sup} via {} dev {}",
        plan.router_addr, plan.host_veth
    );
    cmd::ip_batch(None, &host)?;

    // router: uplink, one bridge per cluster, one veth per member
    let mut router = String::new();
    let _ = writeln!(router, "link set lo up");
    let _ = writeln!(router, "addr add {}/24 dev uplink", plan.router_addr);
    let _ = writeln!(router, "link set uplink up");
    for c in &plan.clusters {
        let _ = writeln!(router, "link add {} type bridge", c.bridge);
        let _ = writeln!(router, "addr add {}/24 dev {}", c.gateway, c.bridge);
        let _ = writeln!(router, "link set {} up", c.bridge);
        for m in std::iter::once(&c.control_plane).chain(&c.nodes) {
            let _ = writeln!(
                router,
                "link add {} type veth peer name eth0 netns {}",
                m.router_port, m.netns
            );
            let _ = writeln!(router, "link set {} master {}", m.router_port, c.bridge);
            let _ = writeln!(router, "link set {} up", m.router_port);
        }
    }
    cmd::ip_batch(Some(r), &router)?;
    cmd::in_netns(r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    cmd::in_netns_input(r, "nft", &["-f", "-"], &nft_ruleset())?;

    // members: address, default route via the cluster bridge
    for c in &plan.clusters {
        for m in std::iter::once(&c.control_plane).chain(&c.nodes) {
            let mut b = String::new();
            let _ = writeln!(b, "link set lo up");
            let _ = writeln!(b, "addr add {}/{} dev eth0", m.addr, c.prefix_len);
            let _ = writeln!(b, "link set eth0 up");
            let _ = writeln!(b, "route add default via {}", c.gateway);
            cmd::ip_batch(Some(&m.netns), &b)?;
        }
    }
    Ok(())
}

/// The router's nft ruleset: forwarded packets whose (in, out) bridge pair is in the `partitions` set are dropped.
pub(crate) fn nft_ruleset() -> String {
    format!(
        "table inet {NFT_TABLE} {{\n\
         \tset partitions {{ type ifname . ifname; }}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tiifname . oifname @partitions drop\n\
         \t}}\n\
         }}\n"
    )
}

fn partition_elements(a: &ClusterInfo, b: &ClusterInfo) -> String {
    format!(
        "{{ \"{0}\" . \"{1}\", \"{1}\" . \"{0}\" }}",
        a.bridge, b.bridge
    )
}

/// Drops all traffic between clusters `a` and `b` (both directions) in the router.
pub fn partition(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    let elems = partition_elements(a, b);
    cmd::in_netns(
        &plan.router_netns,
        "nft",
        &["add", "element", "inet", NFT_TABLE, "partitions", &elems],
    )?;
    Ok(())
}

/// Removes the partition between `a` and `b` (no-op when there is none).
pub fn heal(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    // `nft delete element` fails on a missing element; add first so delete always finds it
    partition(plan, a, b)?;
    let elems = partition_elements(a, b);
    cmd::in_netns(
        &plan.router_netns,
        "nft",
        &["delete", "element", "inet", NFT_TABLE, "partitions", &elems],
    )?;
    Ok(())
}

/// tc class minor (hex) for traffic coming from cluster `from`.
fn class_minor(from: usize) -> String {
    format!("{:x}", 0x10 + from)
}

/// netem arguments for an impairment.
pub(crate) fn netem_args(imp: &Impairment) -> Result<Vec<String>> {
    if !(0.0..=100.0).contains(&imp.loss_percent) || imp.loss_percent.is_nan() {
        return Err(LabError::Spec(format!(
            "loss must be 0..=100 percent, got {}",
            imp.loss_percent
        )));
    }
    let mut v = vec![
        "netem".to_string(),
        "limit".into(),
        "100000".into(),
        "delay".into(),
        format!("{}us", imp.delay.as_micros()),
    ];
    if imp.loss_percent > 0.0 {
        v.push("loss".into());
        v.push(format!("{}%", imp.loss_percent));
    }
    Ok(v)
}

fn tc(netns: &str, args: &[&str]) -> Result<String> {
    cmd::run(
        std::process::Command::new("tc")
            .args(["-n", netns])
            .args(args),
    )
}

/// Applies `imp` to packets routed from cluster `from` into cluster `to` (netem in a per-source HTB class on the
/// bridge of `to`). `root_exists` says whether the bridge already carries the lab's HTB root.
pub fn impair_one_way(
    plan: &LabPlan,
    from: &ClusterInfo,
    to: &ClusterInfo,
    imp: &Impairment,
    root_exists: bool,
) -> Result<()> {
    let r = &plan.router_netns;
    let dev = to.bridge.as_str();
    if !root_exists {
        tc(
            r,
            &[
                "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
            ],
        )?;
        tc(
            r,
            &[
                "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
                HTB_RATE,
            ],
        )?;
    }
    let minor = class_minor(from.index);
    let classid = format!("1:{minor}");
    let handle = format!("{minor}:");
    tc(
        r,
        &[
            "class", "replace", "dev", dev, "parent", "1:", "classid", &classid, "htb", "rate",
            HTB_RATE,
        ],
    )?;
    let netem = netem_args(imp)?;
    let mut args = vec![
        "qdisc", "replace", "dev", dev, "parent", &classid, "handle", &handle,
    ];
    args.extend(netem.iter().map(String::as_str));
    tc(r, &args)?;
    let prio = from.index.to_string();
    let _ = tc(
        r,
        &["filter", "del", "dev", dev, "parent", "1:", "prio", &prio],
    );
    let cidr = from.cidr();
    tc(
        r,
        &[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", &prio, "u32",
            "match", "ip", "src", &cidr, "flowid", &classid,
        ],
    )?;
    Ok(())
}

/// Removes the impairment from `from` into `to`; with `last` also the HTB root of `to`'s bridge.
pub fn clear_one_way(
    plan: &LabPlan,
    from: &ClusterInfo,
    to: &ClusterInfo,
    last: bool,
) -> Result<()> {
    let r = &plan.router_netns;
    let dev = to.bridge.as_str();
    if last {
        // deleting the root removes its classes, filters and netem qdiscs
        return match tc(r, &["qdisc", "del", "dev", dev, "root"]) {
            Ok(_) => Ok(()),
            Err(LabError::Command { stderr, .. })
                if stderr.contains("Cannot delete qdisc with handle of zero")
                    || stderr.contains("No such file") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        };
    }
    let prio = from.index.to_string();
    let classid = format!("1:{}", class_minor(from.index));
    let _ = tc(
        r,
        &["filter", "del", "dev", dev, "parent", "1:", "prio", &prio],
    );
    let _ = tc(r, &["class", "del", "dev", dev, "classid", &classid]);
    Ok(())
}

/// Waits until host interface `name` is gone (namespace deletion frees veths asynchronously).
pub fn wait_host_link_gone(name: &str, timeout: Duration) -> bool {
    crate::process::poll_until(timeout, || !host_link_exists(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_args_in_micros_and_percent() {
        let a = netem_args(&Impairment {
            delay: Duration::from_millis(200),
            loss_percent: 5.0,
        })
        .unwrap();
        assert_eq!(a.join(" "), "netem limit 100000 delay 200000us loss 5%");
        let a = netem_args(&Impairment {
            delay: Duration::from_millis(1),
            loss_percent: 0.0,
        })
        .unwrap();
        assert_eq!(a.join(" "), "netem limit 100000 delay 1000us");
        let e = netem_args(&Impairment {
            delay: Duration::ZERO,
            loss_percent: 150.0,
        })
        .unwrap_err();
        assert!(e.to_string().contains("150"), "{e}");
    }

    #[test]
    fn ruleset_drops_partitioned_bridge_pairs() {
        let r = nft_ruleset();
        assert!(r.contains("iifname . oifname @partitions drop"));
        assert!(r.contains("hook forward"));
    }
}
