//! The guard over every combination of host form, origin and fetch metadata.

use super::*;

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

fn policy(bound: IpAddr, names: &[&str], origins: &[&str]) -> Policy {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let origins: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
    Policy::new(bound, &names, &origins, Keys::NODE_API).unwrap()
}

fn with_host<'a>(method: &'a str, host: &'a str) -> Request<'a> {
    Request {
        host: Header::One(host.as_bytes()),
        ..Request::bare(method)
    }
}

fn refused(v: &Verdict) -> Option<Reason> {
    match v {
        Verdict::Refuse(r) => Some(r.reason),
        _ => None,
    }
}

fn allowed_plain(v: &Verdict) -> bool {
    *v == Verdict::Allow { cors: None }
}

#[test]
fn hosts_a_listener_answers_to() {
    let loopback = policy(V4, &["relay.internal", "Relay-Two.Corp."], &[]);
    for host in [
        "127.0.0.1",
        "127.0.0.1:8080",
        "127.0.0.1:1",
        "127.0.0.1:",
        // Any loopback address: a tunnel or a proxy on this host may arrive on either.
        "127.0.0.2:8080",
        "[::1]",
        "[::1]:8080",
        "[::ffff:127.0.0.1]:8080",
        "localhost",
        "localhost:9999",
        "LOCALHOST",
        "localhost.:8080",
        "LocalHost.",
        "relay.internal",
        "relay.internal:443",
        "RELAY.INTERNAL.",
        "relay-two.corp:8080",
    ] {
        let v = check(&loopback, &with_host("GET", host));
        assert!(allowed_plain(&v), "{host}: {v:?}");
    }
    for host in [
        "rebind.example",
        "rebind.example:8080",
        "localhost.rebind.example",
        "sub.localhost",
        "relay.internal.evil.example",
        "10.0.0.5",
        "[2001:db8::1]:8080",
        "",
        ":8080",
        "localhost:http",
        "localhost:99999",
        "localhost:8080:8080",
        "::1",
        "[::1",
        "[fe80::1%25eth0]",
        "127.0.0.1/x",
        "user@localhost",
        "local host",
        "2130706433",
        "localhost..",
    ] {
        let v = check(&loopback, &with_host("GET", host));
        assert_eq!(refused(&v), Some(Reason::Host), "{host:?}: {v:?}");
    }
    // Bytes that are not UTF-8 are garbage too.
    let v = check(
        &loopback,
        &Request {
            host: Header::One(b"local\xffhost"),
            ..Request::bare("GET")
        },
    );
    assert_eq!(refused(&v), Some(Reason::Host));
}

#[test]
fn ipv6_and_specific_and_wildcard_binds() {
    let v6 = policy(V6, &[], &[]);
    for host in ["[::1]:8081", "[0:0:0:0:0:0:0:1]", "127.0.0.1:8081", "localhost:8081"] {
        assert!(allowed_plain(&check(&v6, &with_host("GET", host))), "{host}");
    }
    assert_eq!(
        refused(&check(&v6, &with_host("GET", "[::2]:8081"))),
        Some(Reason::Host)
    );

    let lan = policy("10.0.0.5".parse().unwrap(), &["relay.corp"], &[]);
    for host in ["10.0.0.5:8081", "localhost", "relay.corp"] {
        assert!(allowed_plain(&check(&lan, &with_host("GET", host))), "{host}");
    }
    for host in ["127.0.0.1", "10.0.0.6", "rebind.example"] {
        assert_eq!(
            refused(&check(&lan, &with_host("GET", host))),
            Some(Reason::Host),
            "{host}"
        );
    }
    // An address configured as a name (a NAT in front of the listener).
    let natted = policy("10.0.0.5".parse().unwrap(), &["192.0.2.7", "[2001:db8::7]"], &[]);
    for host in ["192.0.2.7:80", "[2001:db8::7]:80"] {
        assert!(allowed_plain(&check(&natted, &with_host("GET", host))), "{host}");
    }

    // Bound to every address: any address (a container's published port arrives on one the
    // container does not know), but names still only localhost and configured ones.
    for bound in ["0.0.0.0", "::"] {
        let any = policy(bound.parse().unwrap(), &["relay-agent"], &[]);
        for host in [
            "172.17.0.2:8081",
            "[2001:db8::1]:8081",
            "127.0.0.1",
            "localhost",
            "relay-agent:8081",
        ] {
            assert!(allowed_plain(&check(&any, &with_host("GET", host))), "{bound} {host}");
        }
        assert_eq!(
            refused(&check(&any, &with_host("GET", "rebind.example"))),
            Some(Reason::Host)
        );
    }
}

#[test]
fn the_refusal_names_the_setting_and_the_host() {
    let p = policy(V4, &[], &[]);
    let Verdict::Refuse(r) = check(&p, &with_host("POST", "rebind.example:8080")) else {
        panic!("not refused")
    };
    assert_eq!((r.status, r.code), (421, "unknown_host"));
    for part in [
        "\"rebind.example:8080\"",
        "node.api_names",
        "RELAY_NODE__API_NAMES",
        "localhost",
    ] {
        assert!(r.message.contains(part), "{part} in {}", r.message);
    }
    // Agent's keys.
    let agent = Policy::new(V4, &[], &[], Keys::AGENT_INTAKE).unwrap();
    let Verdict::Refuse(r) = check(&agent, &with_host("GET", "x.example")) else {
        panic!("not refused")
    };
    assert!(r.message.contains("agent.intake_names") && r.message.contains("RELAY_AGENT__INTAKE_NAMES"));
    // A long hostile value is cut in the message.
    let long = format!("{}.example", "a".repeat(5000));
    let Verdict::Refuse(r) = check(&p, &with_host("GET", &long)) else {
        panic!("not refused")
    };
    assert!(r.message.len() < 600, "{}", r.message.len());
}

#[test]
fn where_the_request_names_its_host() {
    let p = policy(V4, &[], &[]);
    // No host at all: HTTP/1.0 may; HTTP/1.1 and later must name one.
    let v = check(&p, &Request::bare("GET"));
    let Verdict::Refuse(r) = v else { panic!("{v:?}") };
    assert_eq!((r.reason, r.status, r.code), (Reason::NoHost, 400, "bad_request"));
    let old = Request {
        before_http11: true,
        ..Request::bare("GET")
    };
    assert!(allowed_plain(&check(&p, &old)));
    // HTTP/1.0 with a foreign Host is still refused.
    let old_foreign = Request {
        before_http11: true,
        host: Header::One(b"rebind.example"),
        ..Request::bare("GET")
    };
    assert_eq!(refused(&check(&p, &old_foreign)), Some(Reason::Host));
    // HTTP/2: `:authority` alone, or with a Host header; both must be answered to.
    let h2 = Request {
        authority: Some("127.0.0.1:8080"),
        ..Request::bare("GET")
    };
    assert!(allowed_plain(&check(&p, &h2)));
    let h2_foreign = Request {
        authority: Some("rebind.example:8080"),
        ..Request::bare("GET")
    };
    assert_eq!(refused(&check(&p, &h2_foreign)), Some(Reason::Host));
    let mixed = Request {
        authority: Some("127.0.0.1:8080"),
        host: Header::One(b"rebind.example"),
        ..Request::bare("GET")
    };
    assert_eq!(refused(&check(&p, &mixed)), Some(Reason::Host));
    let repeated = Request {
        host: Header::Repeated,
        ..Request::bare("GET")
    };
    assert_eq!(refused(&check(&p, &repeated)), Some(Reason::Host));
}

/// A browser request: Host, and optionally Origin and Sec-Fetch-Site.
fn browser<'a>(method: &'a str, host: &'a str, origin: Option<&'a str>, site: Option<&'a str>) -> Request<'a> {
    Request {
        origin: origin.map_or(Header::Absent, |o| Header::One(o.as_bytes())),
        fetch_site: site.map_or(Header::Absent, |s| Header::One(s.as_bytes())),
        ..with_host(method, host)
    }
}

#[test]
fn every_origin_against_every_fetch_site_value() {
    let app = "https://app.example";
    let p = policy(V4, &["relay.internal"], &[app, "http://127.0.0.1:3000"]);
    let host = "127.0.0.1:8080";
    let sites = [
        None,
        Some("same-origin"),
        Some("none"),
        Some("same-site"),
        Some("cross-site"),
        Some("weird"),
    ];
    // (origin, expected for an allowed Sec-Fetch-Site, whether it is an allowed origin)
    let origins: [(Option<&str>, Option<Reason>, bool); 11] = [
        (None, None, false),
        (Some("http://127.0.0.1:8080"), None, false),
        (Some("HTTP://127.0.0.1:8080"), None, false),
        (Some("null"), Some(Reason::OriginNull), false),
        (Some("http://127.0.0.1:9000"), Some(Reason::CrossOrigin), false),
        (Some("https://127.0.0.1:8080"), Some(Reason::CrossOrigin), false),
        (Some("http://localhost:8080"), Some(Reason::CrossOrigin), false),
        (Some("http://evil.example"), Some(Reason::CrossOrigin), false),
        (Some("garbage"), Some(Reason::CrossOrigin), false),
        (Some(app), None, true),
        (Some("http://127.0.0.1:3000"), None, true),
    ];
    for (origin, origin_verdict, is_allowed) in origins {
        for site in sites {
            let v = check(&p, &browser("POST", host, origin, site));
            let site_refuses = matches!(site, Some("same-site" | "cross-site" | "weird"));
            let expected = match (origin_verdict, is_allowed) {
                (Some(r), _) => Some(r),
                // An allowed origin is cross-site by nature: the fetch metadata is expected.
                (None, true) => None,
                (None, false) if site_refuses => Some(Reason::FetchSite),
                (None, false) => None,
            };
            assert_eq!(
                refused(&v),
                expected,
                "Origin {origin:?}, Sec-Fetch-Site {site:?}: {v:?}"
            );
            if is_allowed {
                assert_eq!(
                    v,
                    Verdict::Allow {
                        cors: origin.map(str::to_owned)
                    }
                );
            } else if expected.is_none() {
                assert!(allowed_plain(&v), "{v:?}");
            }
            if let Verdict::Refuse(r) = &v {
                assert_eq!((r.status, r.code), (403, "cross_site"), "{r:?}");
                assert!(r.message.contains("node.api_allowed_origins"), "{}", r.message);
            }
        }
    }
}

#[test]
fn same_origin_follows_the_host_the_browser_used() {
    let p = policy(V4, &["relay.internal"], &[]);
    let same = [
        ("localhost:8080", "http://localhost:8080"),
        ("LOCALHOST:8080", "http://localhost:8080"),
        ("relay.internal", "http://relay.internal"),
        ("relay.internal:80", "http://relay.internal"),
        ("relay.internal", "http://relay.internal:80"),
        ("[::1]:8080", "http://[::1]:8080"),
        // Through an SSH tunnel: the browser's port, not the bound one.
        ("localhost:9999", "http://localhost:9999"),
    ];
    for (host, origin) in same {
        let v = check(&p, &browser("POST", host, Some(origin), Some("same-origin")));
        assert!(allowed_plain(&v), "{host} {origin}: {v:?}");
    }
    let other = [
        ("localhost:8080", "http://localhost:8081"),
        ("localhost:8080", "http://127.0.0.1:8080"),
        ("relay.internal", "https://relay.internal"),
        ("relay.internal", "http://relay.internal:8080"),
        ("localhost:8080", "http://localhost:8080/"),
        ("localhost:8080", "http://user@localhost:8080"),
    ];
    for (host, origin) in other {
        let v = check(&p, &browser("POST", host, Some(origin), None));
        assert_eq!(refused(&v), Some(Reason::CrossOrigin), "{host} {origin}: {v:?}");
    }
    // Without a Host (HTTP/1.0), no Origin can be the listener's own.
    let old = Request {
        before_http11: true,
        origin: Header::One(b"http://127.0.0.1:8080"),
        ..Request::bare("POST")
    };
    assert_eq!(refused(&check(&p, &old)), Some(Reason::CrossOrigin));
}

#[test]
fn the_host_check_comes_before_origins_even_allowed_ones() {
    let p = policy(V4, &[], &["https://app.example"]);
    let v = check(
        &p,
        &browser(
            "POST",
            "rebind.example",
            Some("https://app.example"),
            Some("cross-site"),
        ),
    );
    assert_eq!(refused(&v), Some(Reason::Host));
    let v = check(&p, &browser("POST", "rebind.example", Some("null"), None));
    assert_eq!(refused(&v), Some(Reason::Host));
}

#[test]
fn repeated_browser_headers_are_refused() {
    let p = policy(V4, &[], &["https://app.example"]);
    let origin = Request {
        origin: Header::Repeated,
        ..with_host("POST", "localhost")
    };
    assert_eq!(refused(&check(&p, &origin)), Some(Reason::CrossOrigin));
    let site = Request {
        fetch_site: Header::Repeated,
        ..with_host("POST", "localhost")
    };
    assert_eq!(refused(&check(&p, &site)), Some(Reason::FetchSite));
}

#[test]
fn preflights_of_allowed_origins_are_answered() {
    let p = policy(V4, &[], &["https://app.example/", "http://localhost:3000"]);
    let preflight = |origin: &'static str, private_network: bool| Request {
        origin: Header::One(origin.as_bytes()),
        fetch_site: Header::One(b"cross-site"),
        preflight_method: Header::One(b"POST"),
        private_network,
        ..with_host("OPTIONS", "127.0.0.1:8080")
    };
    let Verdict::Preflight(headers) = check(&p, &preflight("https://app.example", false)) else {
        panic!("no preflight answer")
    };
    let get = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
    assert_eq!(get("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(get("access-control-allow-methods"), Some("GET, POST"));
    let allowed_headers = get("access-control-allow-headers").unwrap().to_ascii_lowercase();
    for h in ["content-type", "idempotency-key", "authorization"] {
        assert!(allowed_headers.contains(h), "{h}");
    }
    assert_eq!(get("access-control-max-age"), Some("600"));
    assert!(get("vary").unwrap().contains("Origin"));
    assert_eq!(get("access-control-allow-private-network"), None);
    let Verdict::Preflight(headers) = check(&p, &preflight("http://localhost:3000", true)) else {
        panic!("no preflight answer")
    };
    assert!(headers.contains(&("access-control-allow-private-network", "true".into())));
    // Not allowed: refused like any cross-origin request.
    assert_eq!(
        refused(&check(&p, &preflight("http://localhost:3001", false))),
        Some(Reason::CrossOrigin)
    );
    // OPTIONS without Access-Control-Request-Method is no preflight: the route answers it.
    let plain_options = Request {
        origin: Header::One(b"https://app.example"),
        ..with_host("OPTIONS", "localhost")
    };
    assert_eq!(
        check(&p, &plain_options),
        Verdict::Allow {
            cors: Some("https://app.example".into())
        }
    );
    // Actual answers carry the origin and the readable headers.
    let h = cors_headers("https://app.example");
    assert!(h.contains(&("access-control-allow-origin", "https://app.example".into())));
    assert!(h
        .iter()
        .any(|(k, v)| *k == "access-control-expose-headers" && v.contains("Retry-After")));
}

#[test]
fn configured_origins_and_names_are_checked() {
    for good in [
        "https://app.example",
        "https://app.example/",
        "http://localhost:3000",
        "http://127.0.0.1:3000",
        "http://[::1]:3000",
        "HTTPS://App.Example:8443",
    ] {
        Origin::parse_setting(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "app.example",
        "https://app.example/path",
        "https://app.example?x=1",
        "https://app.example#x",
        "ftp://app.example",
        "https://user@app.example",
        "https://",
        "https://app.example:0",
        "https://app.example:99999",
        "https://*.example",
        "null",
        "*",
    ] {
        assert!(Origin::parse_setting(bad).is_err(), "{bad} accepted");
    }
    let e = Policy::new(V4, &[], &["https://app.example/path".into()], Keys::NODE_API).unwrap_err();
    assert_eq!(e.key, "node.api_allowed_origins");
    assert!(
        e.to_string()
            .starts_with("node.api_allowed_origins: \"https://app.example/path\""),
        "{e}"
    );
    let e = Policy::new(V4, &[], &["x".into()], Keys::AGENT_INTAKE).unwrap_err();
    assert_eq!(e.key, "agent.intake_allowed_origins");
    for bad in ["relay.corp:8080", "http://relay.corp", "*.corp", "", "a b"] {
        let e = Policy::new(V4, &[bad.into()], &[], Keys::NODE_API).unwrap_err();
        assert_eq!(e.key, "node.api_names", "{bad}: {e}");
        assert!(e.problem.contains(&format!("{bad:?}")), "{bad}: {e}");
    }
    assert_eq!(
        Origin::parse("HTTPS://App.Example:443").unwrap().to_string(),
        "https://app.example"
    );
    assert_eq!(
        env_var("agent.intake_allowed_origins"),
        "RELAY_AGENT__INTAKE_ALLOWED_ORIGINS"
    );
}

#[test]
fn refusals_are_counted_always_and_logged_once_a_minute_per_reason() {
    let tally = Tally::default();
    let t0 = Instant::now();
    assert_eq!(tally.record(Reason::CrossOrigin, t0), Some(0));
    for i in 1..=5 {
        assert_eq!(tally.record(Reason::CrossOrigin, t0 + Duration::from_secs(i)), None);
    }
    // Another reason has its own minute.
    assert_eq!(tally.record(Reason::Host, t0 + Duration::from_secs(2)), Some(0));
    assert_eq!(tally.record(Reason::CrossOrigin, t0 + LOG_INTERVAL), Some(5));
    assert_eq!(tally.record(Reason::CrossOrigin, t0 + LOG_INTERVAL), None);
    let counts = tally.counts();
    assert_eq!(counts.len(), Reason::ALL.len());
    assert!(counts.contains(&(Reason::CrossOrigin, 8)));
    assert!(counts.contains(&(Reason::Host, 1)));
    assert!(counts.contains(&(Reason::FetchSite, 0)));
    let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels, ["host", "no_host", "origin_null", "cross_origin", "fetch_site"]);
}
