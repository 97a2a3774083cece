use super::*;

fn fds(pairs: &[(&str, RawFd)]) -> ActivatedFds {
    let mut by_name: BTreeMap<String, Vec<RawFd>> = BTreeMap::new();
    for (name, fd) in pairs {
        by_name.entry((*name).to_owned()).or_default().push(*fd);
    }
    ActivatedFds { by_name }
}

#[test]
fn claims_by_name() {
    let mut a = fds(&[("unix", 3), ("tls", 4)]);
    assert_eq!(a.claim("unix"), Some(3));
    assert_eq!(a.claim("unix"), None);
    assert_eq!(a.into_unclaimed(), vec![("tls".to_owned(), 4)]);
}

#[test]
fn a_single_unnamed_socket_is_taken() {
    let mut a = fds(&[("unknown", 3)]);
    assert_eq!(a.claim("unix"), Some(3));
    assert!(a.is_empty());
}

#[test]
fn several_unnamed_sockets_are_not_guessed() {
    let mut a = fds(&[("unknown", 3), ("unknown", 4)]);
    assert_eq!(a.claim("unix"), None);
    assert_eq!(a.into_unclaimed().len(), 2);
}

#[test]
fn watchdog_environment() {
    let cases = [
        (Some("300000"), None, Some(300_000)),
        (Some("300000"), Some("42"), Some(300_000)),
        (Some("300000"), Some("43"), None),
        (Some("300000"), Some("junk"), None),
        (Some("0"), None, None),
        (Some("soon"), None, None),
        (None, Some("42"), None),
    ];
    for (usec, pid, want) in cases {
        assert_eq!(
            parse_watchdog(usec, pid, 42),
            want.map(Duration::from_micros),
            "{usec:?} {pid:?}"
        );
    }
}
