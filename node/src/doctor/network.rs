//! The checks of a running node's network, from what it reports: where its API listens,
//! whether peers can reach it, how its NAT maps ports, its relays, its peers, and for one peer
//! why calls to it take the path they take.

use std::net::SocketAddr;

use super::Check;
use crate::network::diagnosis::{ago, MappingVerdict, NetworkDiagnosis, Punch};
use crate::network::{NetworkStatus, Path, PeerSummary, Reachability};

/// A peer id, shortened for a check's area.
pub fn short(peer: &str) -> String {
    if peer.len() > 16 {
        format!("{}…{}", &peer[..8], &peer[peer.len() - 6..])
    } else {
        peer.to_string()
    }
}

/// Where the API listens (`None`: it does not), and whether it wants a key.
pub fn api_exposure(api: Option<SocketAddr>, key_required: bool) -> Check {
    let Some(addr) = api else {
        return Check::ok("api", "the node serves no HTTP API");
    };
    let fix_loopback = format!(
        "serve it on loopback (--api 127.0.0.1:{}), or firewall port {} to the hosts that need it",
        addr.port(),
        addr.port()
    );
    if addr.ip().is_loopback() {
        let key = if key_required { ", with a key" } else { "" };
        return Check::ok("api", format!("on loopback only ({addr}{key}); pages elsewhere are refused by the Host and Origin checks"));
    }
    if !key_required {
        return Check::fail(
            "api",
            format!("listens on {addr}, off loopback, without a key: anyone who reaches it acts as this node's owner"),
            format!("restart with --api-key KEY, or {fix_loopback}"),
        );
    }
    let whom = if addr.ip().is_unspecified() {
        "every interface: anyone who can reach this machine".to_string()
    } else {
        format!("{}: anyone on that network", addr.ip())
    };
    Check::warn(
        "api",
        format!("listens on {addr}, off loopback ({whom} can try the API key)"),
        fix_loopback,
    )
}

/// Reachability, NAT mapping and relays.
pub fn reachability(status: &NetworkStatus, diagnosis: &NetworkDiagnosis) -> Vec<Check> {
    let mut checks = Vec::new();
    let direct: Vec<&String> = status
        .external_addrs
        .iter()
        .filter(|a| !a.contains("p2p-circuit"))
        .collect();
    let relays = status
        .relays
        .iter()
        .map(|r| short(r))
        .collect::<Vec<_>>()
        .join(" and ");
    let symmetric = diagnosis
        .mappings
        .iter()
        .any(|m| m.verdict == MappingVerdict::Varies);
    match status.reachability {
        Reachability::Public => {
            let how = if status.autonat == Reachability::Public {
                "AutoNAT confirmed it through peers at two IPs"
            } else {
                "an address it was given or listens on"
            };
            let at = direct.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ");
            checks.push(Check::ok("reach", format!("reachable directly at {at} ({how})")));
        }
        _ if !status.relays.is_empty() => {
            let why = if symmetric {
                "behind a symmetric NAT: direct connections will not form"
            } else {
                "not reachable directly"
            };
            checks.push(Check::ok("reach", format!("{why}; calls go through relays {relays}")));
        }
        Reachability::Private => checks.push(Check::fail(
            "reach",
            "not reachable directly, and no relay holds a reservation for it: peers cannot call it",
            "join through a public node that relays (--bootstrap), or forward a port and give it with --external-addr",
        )),
        Reachability::Unknown => checks.push(Check::warn(
            "reach",
            format!(
                "not known yet: AutoNAT needs peers at two IPs to confirm an address (it says {:?})",
                status.autonat
            )
            .to_lowercase(),
            "give it a minute with more peers, or state a public address with --external-addr",
        )),
    }
    for mapping in &diagnosis.mappings {
        let area = format!("nat {}", mapping.transport);
        let seen = mapping.seen.join(", ");
        checks.push(match mapping.verdict {
            MappingVerdict::Consistent => Check::ok(
                area,
                format!(
                    "{} of {} peers see one public address ({}): the NAT maps the port consistently, hole punching can work",
                    mapping.agreeing,
                    mapping.observers,
                    mapping.seen.first().map_or("", String::as_str)
                ),
            ),
            MappingVerdict::Varies => {
                let route = if status.relays.is_empty() {
                    "and no relay is held".to_string()
                } else {
                    format!("calls go through relays {relays}")
                };
                Check::warn(
                    area,
                    format!("behind a symmetric NAT: {} peers see different ports ({seen}), so hole punches fail and direct connections will not form; {route}", mapping.observers),
                    "forward a port on the router and give it with --external-addr, or use a router with endpoint-independent mapping",
                )
            }
            MappingVerdict::Unknown => Check::ok(
                area,
                format!("only {} peer has observed this node's address ({seen}): not enough to judge the NAT", mapping.observers),
            ),
        });
    }
    checks
}

/// The relay a peer is reached through, from a circuit address (`…/p2p/RELAY/p2p-circuit…`).
fn relay_of(summary: &PeerSummary) -> Option<String> {
    summary.addresses.iter().find_map(|a| {
        let before = a.split("/p2p-circuit").next()?;
        if before.len() == a.len() {
            return None;
        }
        before.rsplit("/p2p/").next().map(short)
    })
}

/// One line per connected peer: its path, RTT and last hole punch.
pub fn peers(peers: &[PeerSummary], diagnosis: &NetworkDiagnosis) -> Vec<Check> {
    peers
        .iter()
        .map(|p| {
            let id = p.peer_id.to_string();
            let punch = diagnosis.punches.iter().find(|x| x.peer == id);
            peer_line(p, punch)
        })
        .collect()
}

fn punch_text(punch: Option<&Punch>) -> String {
    match punch {
        None => "no hole punch seen from this side".into(),
        Some(p) if p.succeeded => format!("hole punch succeeded {}", ago(p.secs_ago)),
        Some(p) => format!(
            "hole punch failed {}: {}",
            ago(p.secs_ago),
            p.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn peer_line(p: &PeerSummary, punch: Option<&Punch>) -> Check {
    let area = format!("peer {}", short(&p.peer_id.to_string()));
    let rtt = p.rtt_ms.map_or("rtt not measured yet".into(), |ms| {
        format!("rtt {ms:.1} ms")
    });
    let summary = match p.path {
        Path::Relayed => {
            let via = relay_of(p).map_or(String::new(), |r| format!(" through {r}"));
            format!("relayed{via}, {rtt}; {}", punch_text(punch))
        }
        path => format!("{}, {rtt}", path.as_str()),
    };
    Check::ok(area, summary)
}

/// Why calls to `peer` take the path they take: `summary` is the peer as connected now
/// (`None`: not connected), `connect_error` why connecting failed, if it was tried.
pub fn explain_peer(
    peer: &str,
    summary: Option<&PeerSummary>,
    connect_error: Option<&str>,
    status: &NetworkStatus,
    diagnosis: &NetworkDiagnosis,
) -> Vec<Check> {
    let area = format!("peer {}", short(peer));
    let Some(p) = summary else {
        let why = connect_error.unwrap_or("not connected");
        return vec![Check::fail(
            area,
            format!("cannot be reached: {why}"),
            "check that it runs and has joined the mesh (`mesh doctor` on that machine); two nodes behind NATs need a relay they both reach",
        )];
    };
    let punch = diagnosis.punches.iter().find(|x| x.peer == peer);
    let rtt = p.rtt_ms.map_or("rtt not measured yet".into(), |ms| {
        format!("rtt {ms:.1} ms")
    });
    let mut checks = Vec::new();
    match p.path {
        Path::Direct | Path::Local => checks.push(Check::ok(
            area,
            format!(
                "direct connection ({}, {rtt}): calls go straight to it",
                p.addresses.first().map_or("address unknown", String::as_str)
            ),
        )),
        Path::HolePunched => checks.push(Check::ok(
            area,
            format!("hole-punched ({rtt}): the relayed connection was upgraded to a direct one, calls go direct; {}", punch_text(punch)),
        )),
        Path::Relayed => {
            let via = relay_of(p).map_or_else(|| "a relay".to_string(), |r| format!("relay {r}"));
            let symmetric = diagnosis
                .mappings
                .iter()
                .any(|m| m.verdict == MappingVerdict::Varies);
            let why = if symmetric {
                "this node is behind a symmetric NAT (peers see it at different ports), so no hole punch can work".to_string()
            } else {
                match punch {
                    Some(x) if !x.succeeded => format!(
                        "the last hole punch failed {} ({}); it is retried a few times, doubling the wait",
                        ago(x.secs_ago),
                        x.error.as_deref().unwrap_or("no reason given")
                    ),
                    Some(_) => "a hole punch succeeded earlier, but that connection closed".to_string(),
                    None if status.reachability == Reachability::Public => {
                        "the peer dialled this node through the relay and leads the punch; its NAT may be symmetric".to_string()
                    }
                    None => "no hole punch was seen from this side: the peer leads it, or its NAT is symmetric (run `mesh doctor` there)".to_string(),
                }
            };
            checks.push(Check::warn(
                area,
                format!("relayed through {via} ({rtt}): {why}; calls work, with the relay's latency and limits"),
                "forward a port on either side and give it with --external-addr, so the other can dial it",
            ));
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;
    use crate::network::diagnosis::Mapping;
    use crate::test_support::random_peer;

    fn status(reachability: Reachability, relays: Vec<String>) -> NetworkStatus {
        NetworkStatus {
            reachability,
            autonat: Reachability::Unknown,
            external_addrs: vec![],
            relays,
            relaying: false,
            dht: Default::default(),
        }
    }

    fn symmetric() -> NetworkDiagnosis {
        NetworkDiagnosis {
            mappings: vec![Mapping {
                transport: "tcp".into(),
                verdict: MappingVerdict::Varies,
                observers: 2,
                seen: vec!["198.51.100.23:40001".into(), "198.51.100.23:51234".into()],
                agreeing: 1,
            }],
            ..Default::default()
        }
    }

    fn relayed_peer(relay: &str) -> PeerSummary {
        PeerSummary {
            peer_id: random_peer(),
            path: Path::Relayed,
            addresses: vec![format!(
                "/ip4/198.51.100.10/tcp/4001/p2p/{relay}/p2p-circuit"
            )],
            connections: 1,
            agent: None,
            rtt_ms: Some(3.5),
        }
    }

    #[test]
    fn api_off_loopback_warns_and_without_a_key_fails() {
        let on = |s: &str| Some(s.parse().unwrap());
        assert_eq!(
            api_exposure(on("127.0.0.1:7440"), false).verdict,
            Verdict::Ok
        );
        assert_eq!(api_exposure(None, false).verdict, Verdict::Ok);
        let open = api_exposure(on("0.0.0.0:7440"), true);
        assert_eq!(open.verdict, Verdict::Warn);
        assert!(open.summary.contains("every interface"), "{}", open.summary);
        assert!(open.fix.unwrap().contains("--api 127.0.0.1:7440"));
        assert_eq!(
            api_exposure(on("192.168.1.5:7440"), false).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn a_symmetric_nat_names_the_relays_calls_go_through() {
        let relays = vec![random_peer().to_string(), random_peer().to_string()];
        let checks = reachability(&status(Reachability::Private, relays.clone()), &symmetric());
        assert_eq!(checks[0].verdict, Verdict::Ok);
        assert!(checks[0].summary.starts_with(
            "behind a symmetric NAT: direct connections will not form; calls go through relays"
        ));
        assert!(checks[0].summary.contains(&short(&relays[1])));
        assert_eq!(
            (checks[1].area.as_str(), checks[1].verdict),
            ("nat tcp", Verdict::Warn)
        );
        assert!(checks[1].summary.contains("198.51.100.23:51234"));
    }

    #[test]
    fn private_without_relays_fails_and_unknown_warns() {
        let none = NetworkDiagnosis::default();
        assert_eq!(
            reachability(&status(Reachability::Private, vec![]), &none)[0].verdict,
            Verdict::Fail
        );
        assert_eq!(
            reachability(&status(Reachability::Unknown, vec![]), &none)[0].verdict,
            Verdict::Warn
        );
        let public = reachability(&status(Reachability::Public, vec![]), &none);
        assert_eq!(public[0].verdict, Verdict::Ok);
    }

    #[test]
    fn a_relayed_peer_is_explained_by_the_nat_or_the_last_punch() {
        let relay = random_peer().to_string();
        let p = relayed_peer(&relay);
        let id = p.peer_id.to_string();
        let st = status(Reachability::Private, vec![relay.clone()]);
        let why = explain_peer(&id, Some(&p), None, &st, &symmetric());
        assert_eq!(why[0].verdict, Verdict::Warn);
        assert!(
            why[0].summary.contains(&format!("relay {}", short(&relay))),
            "{}",
            why[0].summary
        );
        assert!(
            why[0].summary.contains("symmetric NAT"),
            "{}",
            why[0].summary
        );
        let failed = NetworkDiagnosis {
            punches: vec![Punch {
                peer: id.clone(),
                succeeded: false,
                error: Some("all dials failed".into()),
                secs_ago: 30,
            }],
            ..Default::default()
        };
        let why = explain_peer(&id, Some(&p), None, &st, &failed);
        assert!(
            why[0]
                .summary
                .contains("last hole punch failed 30 s ago (all dials failed)"),
            "{}",
            why[0].summary
        );
        let line = peers(std::slice::from_ref(&p), &failed);
        assert!(
            line[0].summary.starts_with(&format!(
                "relayed through {}, rtt 3.5 ms; hole punch failed",
                short(&relay)
            )),
            "{}",
            line[0].summary
        );
    }

    #[test]
    fn a_direct_peer_is_fine_and_an_unreachable_one_fails() {
        let mut p = relayed_peer("x");
        p.path = Path::Direct;
        p.addresses = vec!["/ip4/203.0.113.7/tcp/4001".into()];
        let id = p.peer_id.to_string();
        let st = status(Reachability::Public, vec![]);
        let why = explain_peer(&id, Some(&p), None, &st, &NetworkDiagnosis::default());
        assert_eq!(why[0].verdict, Verdict::Ok);
        assert!(why[0].summary.contains("/ip4/203.0.113.7/tcp/4001"));
        let gone = explain_peer(
            &id,
            None,
            Some("peer was not found on the mesh"),
            &st,
            &NetworkDiagnosis::default(),
        );
        assert_eq!(gone[0].verdict, Verdict::Fail);
        assert!(gone[0].summary.contains("not found"));
    }
}
