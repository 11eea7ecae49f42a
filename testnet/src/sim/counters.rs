//! What each simulated node sent and received, read from its own metrics (the text `GET
//! /metrics` serves: libp2p-metrics' Kademlia, identify and ping families, the transport's
//! bytes, mesh's catalogs). Parsing and the per-minute arithmetic are plain functions.

use std::collections::BTreeMap;

/// The message kinds the simulation reports, each a sum of metric samples.
pub const KINDS: [(&str, &[&str]); 13] = [
    (
        "dht announce (add_provider in)",
        &["libp2p_kad_inbound_requests_total{request=\"AddProvider\""],
    ),
    (
        "dht lookup (get_providers in)",
        &["libp2p_kad_inbound_requests_total{request=\"GetProvider\""],
    ),
    (
        "dht routing (find_node in)",
        &["libp2p_kad_inbound_requests_total{request=\"FindNode\""],
    ),
    (
        "identify (received + pushed)",
        &[
            "libp2p_identify_received_total",
            "libp2p_identify_pushed_total",
        ],
    ),
    ("ping", &["libp2p_ping_rtt_seconds_count"]),
    ("catalogs served", &["mesh_catalogs_served_total"]),
    (
        "bytes in",
        &["libp2p_bandwidth_bytes_total{protocols=\"/memory\",direction=\"Inbound\""],
    ),
    (
        "bytes out",
        &["libp2p_bandwidth_bytes_total{protocols=\"/memory\",direction=\"Outbound\""],
    ),
    ("provider lookups made", &["mesh_dht_lookup_requests_count"]),
    ("their dht requests", &["mesh_dht_lookup_requests_sum"]),
    (
        "dht requests sent: routing walks (bootstrap)",
        &["libp2p_kad_query_result_num_requests_sum{type=\"Bootstrap\""],
    ),
    (
        "dht requests sent: peer lookups (closest peers)",
        &["libp2p_kad_query_result_num_requests_sum{type=\"GetClosestPeers\""],
    ),
    (
        "dht requests sent: announcements",
        &[
            "libp2p_kad_query_result_num_requests_sum{type=\"StartProviding\"",
            "libp2p_kad_query_result_num_requests_sum{type=\"RepublishProvider\"",
        ],
    ),
];

/// Where [`KINDS`] has the lookups made and their requests.
pub const LOOKUPS: usize = 8;
pub const LOOKUP_REQUESTS: usize = 9;

/// Every sample of a metrics text, by its name and labels as written.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The total of the samples whose key starts with one of `prefixes`.
pub fn total(samples: &BTreeMap<String, f64>, prefixes: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(_, v)| v)
        .sum()
}

/// Connections a node opened, and those that closed (each closed one is a sample of the
/// duration histogram), by libp2p-metrics' swarm family.
pub const CONNECTIONS_OPENED: &str = "libp2p_swarm_connections_established_total{";
pub const CONNECTIONS_CLOSED: &str = "libp2p_swarm_connections_duration_seconds_count{";

/// How many connections a node holds now: opened less closed, over every role and transport.
pub fn open_connections(text: &str) -> f64 {
    let samples = samples(text);
    total(&samples, &[CONNECTIONS_OPENED]) - total(&samples, &[CONNECTIONS_CLOSED])
}

/// One node's count of each kind in [`KINDS`].
pub fn kinds(text: &str) -> Vec<f64> {
    let samples = samples(text);
    KINDS.iter().map(|(_, p)| total(&samples, p)).collect()
}

/// Per node per minute: the mean over nodes of `after - before` for each kind, over `minutes`.
pub fn per_node_per_minute(pairs: &[(Vec<f64>, Vec<f64>)], minutes: f64) -> Vec<f64> {
    let n = pairs.len().max(1) as f64;
    (0..KINDS.len())
        .map(|k| {
            let sum: f64 = pairs.iter().map(|(b, a)| (a[k] - b[k]).max(0.0)).sum();
            sum / n / minutes.max(1e-9)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP libp2p_kad_inbound_requests Number of inbound requests.
# TYPE libp2p_kad_inbound_requests counter
libp2p_kad_inbound_requests_total{request=\"AddProvider\"} 4
libp2p_kad_inbound_requests_total{request=\"GetProvider\"} 2
libp2p_kad_inbound_requests_total{request=\"FindNode\"} 10
libp2p_identify_received_total 3
libp2p_identify_pushed_total 1
libp2p_ping_rtt_seconds_count 7
libp2p_ping_rtt_seconds_sum 0.01
mesh_catalogs_served_total 5
libp2p_bandwidth_bytes_total{protocols=\"/memory\",direction=\"Inbound\"} 1000
libp2p_bandwidth_bytes_total{protocols=\"/memory\",direction=\"Outbound\"} 2000
mesh_dht_lookup_requests_sum 30.0
mesh_dht_lookup_requests_count 3
mesh_dht_lookup_requests_bucket{le=\"1.0\"} 0
libp2p_kad_query_result_num_requests_sum{type=\"Bootstrap\"} 40.0
libp2p_kad_query_result_num_requests_count{type=\"Bootstrap\"} 2
libp2p_kad_query_result_num_requests_sum{type=\"GetClosestPeers\"} 12.0
libp2p_kad_query_result_num_requests_sum{type=\"StartProviding\"} 20.0
libp2p_kad_query_result_num_requests_sum{type=\"RepublishProvider\"} 21.0
libp2p_swarm_connections_established_total{role=\"Dialer\",protocols=\"/memory\"} 6
libp2p_swarm_connections_established_total{role=\"Listener\",protocols=\"/memory\"} 5
libp2p_swarm_connections_duration_seconds_sum{role=\"Dialer\",protocols=\"/memory\"} 40.0
libp2p_swarm_connections_duration_seconds_count{role=\"Dialer\",protocols=\"/memory\"} 3
libp2p_swarm_connections_duration_seconds_count{role=\"Listener\",protocols=\"/memory\"} 1
# EOF
";

    #[test]
    fn each_kind_sums_its_samples() {
        let expected = [
            4.0, 2.0, 10.0, 4.0, 7.0, 5.0, 1000.0, 2000.0, 3.0, 30.0, 40.0, 12.0, 41.0,
        ];
        assert_eq!(kinds(TEXT), expected);
        assert_eq!(kinds("# EOF\n"), [0.0; KINDS.len()]);
    }

    #[test]
    fn open_connections_are_the_opened_less_the_closed() {
        assert_eq!(open_connections(TEXT), 7.0);
        assert_eq!(open_connections("# EOF\n"), 0.0);
    }

    #[test]
    fn rates_are_means_over_nodes_per_minute() {
        let pairs = vec![
            (vec![0.0; KINDS.len()], vec![2.0; KINDS.len()]),
            (vec![1.0; KINDS.len()], vec![5.0; KINDS.len()]),
        ];
        let rates = per_node_per_minute(&pairs, 2.0);
        assert_eq!(rates, [1.5; KINDS.len()]);
        // A counter that went back (a node restarted) counts nothing, not a negative.
        let back = per_node_per_minute(&[(vec![5.0; KINDS.len()], vec![1.0; KINDS.len()])], 1.0);
        assert_eq!(back, [0.0; KINDS.len()]);
    }
}
