//! Unit tests of the connect state machine, without a swarm.

use super::*;

use crate::test_support::random_peer as peer;

fn conn(n: usize) -> ConnectionId {
    ConnectionId::new_unchecked(n)
}

fn addr(s: &str) -> Multiaddr {
    s.parse().unwrap()
}

type Answer<T> = oneshot::Receiver<Result<T, NetworkError>>;

fn connect(c: &mut Connects<u32>, target: PeerId) -> (Option<Step>, Answer<()>) {
    let (tx, rx) = oneshot::channel();
    (c.connect(target, false, tx), rx)
}

/// What the connect got, if anything yet.
fn answer<T: std::fmt::Debug>(rx: &mut Answer<T>) -> Option<Result<T, NetworkError>> {
    rx.try_recv().ok()
}

#[test]
fn a_dial_that_connects_answers_ok() {
    let (me, target) = (peer(), peer());
    let mut c = Connects::<u32>::new(me);
    let (step, mut rx) = connect(&mut c, target);
    assert_eq!(step, Some(Step::Dial(target)));
    assert_eq!(c.dial_started(target, DialStart::Started), None);
    c.on_dialing(conn(1), target);
    assert!(answer(&mut rx).is_none(), "waits for the dial");
    assert!(!c.on_established(conn(1), target));
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
}

#[test]
fn already_connected_answers_at_once() {
    let mut c = Connects::<u32>::new(peer());
    let (tx, mut rx) = oneshot::channel();
    assert_eq!(c.connect(peer(), true, tx), None);
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
}

#[test]
fn dialling_oneself_is_refused() {
    let me = peer();
    let mut c = Connects::<u32>::new(me);
    let (step, mut rx) = connect(&mut c, me);
    assert_eq!(step, None);
    assert!(matches!(answer(&mut rx), Some(Err(NetworkError::SelfDial))));
}

#[test]
fn failed_dials_lead_to_a_lookup_then_a_dial_that_connects() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    c.dial_started(target, DialStart::Started);
    c.on_dialing(conn(1), target);
    let step = c.on_dial_failed(conn(1), Some(target), false, "connection refused");
    assert_eq!(step, Some(Step::LookUp(target)));
    c.lookup_started(7, target);
    assert_eq!(c.lookup_target(&7), Some(target));
    let found = vec![addr("/ip4/198.51.100.2/tcp/4001")];
    let step = c.on_lookup_done(&7, Some(found.clone()), false);
    assert_eq!(step, Some(Step::DialAt(target, found)));
    assert_eq!(c.lookup_target(&7), None);
    assert_eq!(c.dial_started(target, DialStart::Started), None);
    c.on_dialing(conn(2), target);
    assert!(answer(&mut rx).is_none());
    c.on_established(conn(2), target);
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
}

#[test]
fn no_known_address_looks_up_and_not_found_fails() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    let step = c.dial_started(target, DialStart::NoAddresses);
    assert_eq!(step, Some(Step::LookUp(target)));
    c.lookup_started(1, target);
    assert_eq!(c.on_lookup_done(&1, None, false), None);
    match answer(&mut rx) {
        Some(Err(e @ NetworkError::NotFound { .. })) => {
            assert!(e.to_string().contains("not found"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn found_without_addresses_is_not_found() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    c.dial_started(target, DialStart::NoAddresses);
    c.lookup_started(1, target);
    assert_eq!(c.on_lookup_done(&1, Some(vec![]), false), None);
    assert!(matches!(
        answer(&mut rx),
        Some(Err(NetworkError::NotFound { .. }))
    ));
}

#[test]
fn a_second_failure_after_the_lookup_is_final() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    c.on_dialing(conn(1), target);
    assert_eq!(
        c.on_dial_failed(conn(1), Some(target), false, "refused"),
        Some(Step::LookUp(target))
    );
    c.lookup_started(1, target);
    let found = vec![addr("/ip4/198.51.100.2/tcp/4001")];
    assert!(c.on_lookup_done(&1, Some(found), false).is_some());
    c.on_dialing(conn(2), target);
    assert_eq!(
        c.on_dial_failed(conn(2), Some(target), false, "timed out"),
        None
    );
    match answer(&mut rx) {
        Some(Err(NetworkError::Unreachable { peer, reason })) => {
            assert_eq!((peer, reason.as_str()), (target, "timed out"))
        }
        other => panic!("{other:?}"),
    }
    // A later connect starts over: its failure may look the peer up again.
    let (_, _rx) = connect(&mut c, target);
    c.on_dialing(conn(3), target);
    assert_eq!(
        c.on_dial_failed(conn(3), Some(target), false, "refused"),
        Some(Step::LookUp(target))
    );
}

#[test]
fn fails_only_when_no_dial_remains() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut first) = connect(&mut c, target);
    let (_, mut second) = connect(&mut c, target);
    // Ours, and one another behaviour (mDNS, a provider query) started.
    c.on_dialing(conn(1), target);
    c.on_dialing(conn(2), target);
    assert_eq!(c.on_dial_failed(conn(1), Some(target), false, "a"), None);
    assert!(answer(&mut first).is_none(), "conn 2 may still connect");
    assert_eq!(
        c.on_dial_failed(conn(2), Some(target), false, "b"),
        Some(Step::LookUp(target))
    );
    c.lookup_started(1, target);
    c.on_dialing(conn(3), target);
    // The lookup finds nothing while a dial is still in flight: wait for that dial.
    assert_eq!(c.on_lookup_done(&1, None, false), None);
    assert!(answer(&mut first).is_none());
    assert_eq!(c.on_dial_failed(conn(3), Some(target), false, "c"), None);
    assert!(matches!(
        answer(&mut first),
        Some(Err(NetworkError::Unreachable { .. }))
    ));
    assert!(matches!(
        answer(&mut second),
        Some(Err(NetworkError::Unreachable { .. }))
    ));
}

#[test]
fn a_refused_dial_fails_without_a_lookup() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    assert_eq!(
        c.dial_started(target, DialStart::Refused("too many pending".into())),
        None
    );
    assert!(matches!(
        answer(&mut rx),
        Some(Err(NetworkError::DialFailed { .. }))
    ));
}

#[test]
fn a_failure_while_connected_through_another_connection_is_ignored() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    c.on_dialing(conn(1), target);
    assert_eq!(c.on_dial_failed(conn(1), Some(target), true, "x"), None);
    assert!(answer(&mut rx).is_none(), "answered by on_established");
    c.on_established(conn(2), target);
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
}

#[test]
fn an_address_dial_reports_the_peer_or_the_error() {
    let mut c = Connects::<u32>::new(peer());
    let who = peer();
    let (tx, mut ok) = oneshot::channel();
    c.dial_addr(conn(1), addr("/ip4/198.51.100.3/tcp/1"), tx, false);
    assert!(c.on_established(conn(1), who), "a bootstrap address");
    assert!(matches!(answer(&mut ok), Some(Ok(p)) if p == who));
    let (tx, mut err) = oneshot::channel();
    c.dial_addr(conn(2), addr("/ip4/198.51.100.3/tcp/2"), tx, false);
    assert_eq!(c.on_dial_failed(conn(2), None, false, "refused"), None);
    match answer(&mut err) {
        Some(Err(NetworkError::DialAddr { addr: a, reason })) => {
            assert_eq!(a, addr("/ip4/198.51.100.3/tcp/2"));
            assert_eq!(reason, "refused");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_dial_slow_to_connect_gets_a_lookup_alongside_once() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let t = Instant::now();
    let (step, mut rx) = connect(&mut c, target);
    assert_eq!(step, Some(Step::Dial(target)));
    assert_eq!(c.dial_started(target, DialStart::Started), None);
    c.lookup_later(target, t);
    c.on_dialing(conn(1), target);
    assert_eq!(c.next_due(), Some(t + LOOKUP_ALONGSIDE_AFTER));
    assert!(c.due_lookups(t, |_| false).is_empty(), "not yet");
    let due = c.due_lookups(t + LOOKUP_ALONGSIDE_AFTER, |_| false);
    assert_eq!(due, vec![Step::LookUp(target)]);
    assert_eq!(c.next_due(), None);
    c.lookup_started(7, target);
    // The lookup finds fresh addresses: dialled alongside the hanging dial.
    let fresh = vec![addr("/ip4/192.0.2.9/tcp/4001")];
    assert_eq!(
        c.on_lookup_done(&7, Some(fresh.clone()), false),
        Some(Step::DialAt(target, fresh))
    );
    c.on_dialing(conn(2), target);
    // The stale dial fails: the fresh one is still in flight, so nothing is decided.
    assert_eq!(
        c.on_dial_failed(conn(1), Some(target), false, "timeout"),
        None
    );
    assert!(answer(&mut rx).is_none());
    c.on_established(conn(2), target);
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
}

#[test]
fn a_dial_that_connects_in_time_gets_no_lookup() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let t = Instant::now();
    let (_, mut rx) = connect(&mut c, target);
    c.dial_started(target, DialStart::Started);
    c.lookup_later(target, t);
    c.on_dialing(conn(1), target);
    c.on_established(conn(1), target);
    assert!(matches!(answer(&mut rx), Some(Ok(()))));
    assert_eq!(c.next_due(), None);
    assert!(c
        .due_lookups(t + LOOKUP_ALONGSIDE_AFTER, |_| false)
        .is_empty());
    // Nor does a peer connected by another dial meanwhile.
    let other = peer();
    let _ = connect(&mut c, other);
    c.lookup_later(other, t);
    assert!(c
        .due_lookups(t + LOOKUP_ALONGSIDE_AFTER, |_| true)
        .is_empty());
}

#[test]
fn a_second_connect_to_the_same_peer_waits_on_the_first_dial() {
    let (me, target) = (peer(), peer());
    let mut c = Connects::<u32>::new(me);
    let (first, mut rx1) = connect(&mut c, target);
    assert_eq!(first, Some(Step::Dial(target)));
    c.dial_started(target, DialStart::Started);
    c.on_dialing(conn(1), target);
    let (second, mut rx2) = connect(&mut c, target);
    assert_eq!(second, None, "no second dial while the first is under way");
    c.on_established(conn(1), target);
    assert!(matches!(answer(&mut rx1), Some(Ok(()))));
    assert!(matches!(answer(&mut rx2), Some(Ok(()))));
    // Once answered, a new connect dials again.
    let (third, _rx3) = connect(&mut c, target);
    assert_eq!(third, Some(Step::Dial(target)));
}

const PORT_TAKEN: &str = "Multiple dial errors occurred:\n - Address already in use (os error 98)";

#[test]
fn an_address_dial_whose_port_is_taken_is_retried_once_from_a_new_port() {
    let mut c = Connects::<u32>::new(peer());
    let bootstrap = addr("/ip4/127.0.0.1/tcp/33945");
    let (tx, mut rx) = oneshot::channel();
    c.dial_addr(conn(1), bootstrap.clone(), tx, false);
    assert!(c
        .retry_from_new_port(conn(1), "connection refused")
        .is_none());
    let (again, reply) = c.retry_from_new_port(conn(1), PORT_TAKEN).expect("a retry");
    assert_eq!(again, bootstrap);
    assert!(answer(&mut rx).is_none(), "the reply goes with the retry");
    c.dial_addr(conn(2), again, reply, true);
    assert!(c.retry_from_new_port(conn(2), PORT_TAKEN).is_none(), "once");
    c.on_dial_failed(conn(2), None, false, PORT_TAKEN);
    assert!(matches!(
        answer(&mut rx),
        Some(Err(NetworkError::DialAddr { .. }))
    ));
}

#[test]
fn a_connect_whose_port_is_taken_dials_from_a_new_port_before_looking_up() {
    let target = peer();
    let mut c = Connects::<u32>::new(peer());
    let (_, mut rx) = connect(&mut c, target);
    c.dial_started(target, DialStart::Started);
    c.on_dialing(conn(1), target);
    let step = c.on_dial_failed(conn(1), Some(target), false, PORT_TAKEN);
    assert_eq!(step, Some(Step::DialFromNewPort(target)));
    assert_eq!(c.dial_started(target, DialStart::Started), None);
    c.on_dialing(conn(2), target);
    let step = c.on_dial_failed(conn(2), Some(target), false, PORT_TAKEN);
    assert_eq!(
        step,
        Some(Step::LookUp(target)),
        "a new port once, then the DHT"
    );
    assert!(answer(&mut rx).is_none());
}

#[test]
fn only_a_taken_local_address_counts_as_a_taken_port() {
    assert!(local_port_taken(PORT_TAKEN));
    assert!(!local_port_taken("Connection refused (os error 111)"));
    assert!(!local_port_taken(
        "Cannot assign requested address (os error 99)"
    ));
}
