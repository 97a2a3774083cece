use super::*;

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid tenant name")
}

fn peer(uid: u32, gid: u32, groups: &[u32]) -> Identity {
    Identity::Unix(UnixPeer::new(uid, gid, Some(1), groups.to_vec()))
}

fn map() -> TenantMap {
    TenantMap::new(vec![
        (
            tenant("claims"),
            vec![Principal::Uid(1001), Principal::Gid(2001)],
        ),
        (tenant("search"), vec![Principal::Gid(2002)]),
        (
            tenant("ops"),
            vec![Principal::Gid(2002), Principal::Uid(1003)],
        ),
    ])
}

#[test]
fn resolves_by_table() {
    use TenantLookupError::*;
    let m = map();
    let cases: &[(&str, Identity, Result<&str, TenantLookupError>)] = &[
        ("uid rule", peer(1001, 100, &[]), Ok("claims")),
        ("primary group", peer(5000, 2001, &[]), Ok("claims")),
        (
            "supplementary group",
            peer(5000, 100, &[7, 2001]),
            Ok("claims"),
        ),
        ("nobody", peer(5000, 100, &[7]), Err(NoTenant)),
        (
            "two tenants by group",
            peer(5000, 100, &[2002]),
            Err(Ambiguous(vec![tenant("search"), tenant("ops")])),
        ),
        ("uid beats group", peer(1003, 2002, &[]), Ok("ops")),
        (
            "uid beats another tenant's group",
            peer(1001, 2002, &[]),
            Ok("claims"),
        ),
    ];
    for (name, identity, want) in cases {
        let got = m.resolve(identity).map(TenantId::as_str);
        assert_eq!(&got, want, "case {name}");
    }
}

#[test]
fn empty_map_matches_nobody() {
    assert_eq!(
        TenantMap::default().resolve(&peer(0, 0, &[])),
        Err(TenantLookupError::NoTenant)
    );
}

#[test]
fn groups_are_normalised() {
    let UnixPeer { groups, .. } = UnixPeer::new(1, 1, None, vec![9, 3, 9, 1]);
    assert_eq!(groups, vec![1, 3, 9]);
}

#[test]
fn tenant_names() {
    for ok in ["a", "claims", "team-7.prod_eu", &"x".repeat(64)] {
        assert!(TenantId::parse(ok).is_ok(), "{ok:?}");
    }
    for bad in [
        "",
        "-lead",
        ".hidden",
        "has space",
        "ünï",
        "a/b",
        &"x".repeat(65),
    ] {
        assert!(TenantId::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn identity_serialises_with_transport_tag() {
    let json = serde_json::to_value(peer(1, 2, &[3])).expect("serialise");
    assert_eq!(
        json,
        serde_json::json!({"transport": "unix", "uid": 1, "gid": 2, "pid": 1, "groups": [3]})
    );
}

fn tls(uri: Option<&str>, dns: &[&str], cn: Option<&str>) -> Identity {
    Identity::Tls(TlsPeer {
        uri: uri.map(str::to_owned),
        dns_names: dns.iter().map(|d| (*d).to_owned()).collect(),
        common_name: cn.map(str::to_owned),
        serial: "01".to_owned(),
        sha256: "00".repeat(32),
        not_after: 0,
        remote_addr: "127.0.0.1:1".to_owned(),
    })
}

fn tls_map() -> TenantMap {
    TenantMap::new(vec![
        (
            tenant("claims"),
            vec![Principal::Uri("spiffe://corp.example/tenant/claims".into())],
        ),
        (
            tenant("search"),
            vec![Principal::DnsName("search.corp.example".into())],
        ),
        (
            tenant("legacy"),
            vec![Principal::CommonName("legacy-app".into())],
        ),
        (
            tenant("unix-only"),
            vec![Principal::Uid(0), Principal::Gid(0)],
        ),
    ])
}

#[test]
fn tls_peers_map_by_uri_and_only_opted_in_names() {
    use TenantLookupError::*;
    let strict = tls_map();
    let lenient = tls_map().with_tls_names(TlsNameRules {
        dns_names: true,
        common_name: true,
    });
    let claims = tls(
        Some("spiffe://corp.example/tenant/claims"),
        &["search.corp.example"],
        Some("legacy-app"),
    );
    let search = tls(None, &["SEARCH.corp.example"], Some("legacy-app"));
    let legacy = tls(Some("spiffe://corp.example/other"), &[], Some("legacy-app"));
    let cases: &[(&TenantMap, &Identity, Result<&str, TenantLookupError>)] = &[
        (&strict, &claims, Ok("claims")),
        (&strict, &search, Err(NoTenant)),
        (&strict, &legacy, Err(NoTenant)),
        (&lenient, &claims, Ok("claims")),
        (&lenient, &search, Ok("search")),
        (&lenient, &legacy, Ok("legacy")),
        // Unix rules never match a TLS peer, nor URI rules a Unix peer.
        (&lenient, &tls(None, &[], None), Err(NoTenant)),
        (&strict, &peer(0, 0, &[]), Ok("unix-only")),
    ];
    for (i, (map, identity, want)) in cases.iter().enumerate() {
        assert_eq!(
            &map.resolve(identity).map(TenantId::as_str),
            want,
            "case {i}"
        );
    }
}

#[test]
fn uri_prefixes_do_not_match() {
    let m = tls_map();
    let sneaky = tls(
        Some("spiffe://corp.example/tenant/claims/../admin"),
        &[],
        None,
    );
    assert_eq!(m.resolve(&sneaky), Err(TenantLookupError::NoTenant));
}
