use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn sources_in_order_of_preference() {
    type Case<'a> = (&'a [(&'a str, &'a str)], Origin, Option<&'a str>);
    let cases: &[Case<'_>] = &[
        (
            &[("x-request-id", "abc-123")],
            Origin::Header,
            Some("abc-123"),
        ),
        (
            &[("x-request-id", "abc"), ("traceparent", TRACE)],
            Origin::Header,
            Some("abc"),
        ),
        (
            &[("traceparent", TRACE)],
            Origin::TraceParent,
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        (
            &[("x-request-id", "has space"), ("traceparent", TRACE)],
            Origin::TraceParent,
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        (&[("x-request-id", "")], Origin::Generated, None),
        (&[("x-request-id", "line\tbreak")], Origin::Generated, None),
        (
            &[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )],
            Origin::Generated,
            None,
        ),
        (
            &[(
                "traceparent",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
            Origin::Generated,
            None,
        ),
        (
            &[(
                "traceparent",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            )],
            Origin::Generated,
            None,
        ),
        (&[], Origin::Generated, None),
    ];
    for (hs, origin, id) in cases {
        let (got, got_origin) = RequestId::from_headers(&headers(hs));
        assert_eq!(got_origin, *origin, "{hs:?}");
        if let Some(id) = id {
            assert_eq!(got.as_str(), *id, "{hs:?}");
        }
    }
}

#[test]
fn long_ids_are_replaced() {
    let long = "a".repeat(129);
    let (id, origin) = RequestId::from_headers(&headers(&[("x-request-id", &long)]));
    assert_eq!(origin, Origin::Generated);
    assert_ne!(id.as_str(), long);
    let ok = "a".repeat(128);
    assert_eq!(
        RequestId::from_headers(&headers(&[("x-request-id", &ok)]))
            .0
            .as_str(),
        ok
    );
}

#[test]
fn generated_ids_are_unique_hex() {
    let a = RequestId::generate();
    let b = RequestId::generate();
    assert_ne!(a, b);
    assert_eq!(a.as_str().len(), 32);
    assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
}
