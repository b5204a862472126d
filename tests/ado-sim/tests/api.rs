//! End-to-end tests of the simulator over real HTTP with a plain hyper client: every endpoint,
//! each profile difference, the version gate, faults and service hooks.

use std::time::Duration;

use ado_sim::{parse_latest_supported, Profile, Sim, SimHandle, SimOptions, Version};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::HeaderMap;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

struct T {
    sim: SimHandle,
    http: Client<HttpConnector, Full<Bytes>>,
    auth: String,
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn start(profile: Profile) -> T {
    let sim = Sim::start(SimOptions {
        profile,
        projects: vec!["Fabrikam".into()],
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts");
    let auth = sim.auth_header();
    T {
        http: Client::builder(TokioExecutor::new()).build_http(),
        sim,
        auth,
    }
}

fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

impl T {
    /// `path` is relative to the collection URL and includes the query.
    async fn raw(&self, method: &str, path: &str, ct: Option<&str>, body: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("{}/{path}", self.sim.url));
        if !self.auth.is_empty() {
            b = b.header("authorization", &self.auth);
        }
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .http
            .request(b.body(Full::new(Bytes::from(body))).expect("request"))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp { status, headers, body }
    }
    async fn get(&self, path: &str) -> Resp {
        self.raw("GET", path, None, Vec::new(), &[]).await
    }
    async fn post(&self, path: &str, v: Value) -> Resp {
        self.raw("POST", path, Some("application/json"), v.to_string().into_bytes(), &[])
            .await
    }
    async fn patch_doc(&self, method: &str, path: &str, ops: Value) -> Resp {
        self.raw(
            method,
            path,
            Some("application/json-patch+json"),
            ops.to_string().into_bytes(),
            &[],
        )
        .await
    }
    /// POSTs to the control API at the server's root.
    async fn control(&self, path: &str, v: Value) -> Resp {
        let req = hyper::Request::post(format!("http://{}/_sim/{path}", self.sim.addr))
            .header("authorization", &self.auth)
            .body(Full::new(Bytes::from(v.to_string())))
            .expect("request");
        let resp = self.http.request(req).await.expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp { status, headers, body }
    }
    async fn create(&self, ty: &str, ops: Value) -> Value {
        let v = self.sim.profile().latest();
        let r = self
            .patch_doc(
                "POST",
                &format!("Fabrikam/_apis/wit/workitems/${ty}?api-version={v}"),
                ops,
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }
    async fn create_titled(&self, title: &str) -> u64 {
        self.create("Task", json!([add("/fields/System.Title", json!(title))]))
            .await["id"]
            .as_u64()
            .expect("id")
    }
}

#[tokio::test]
async fn version_gate_answers_the_latest_version_in_the_service_wording_per_profile() {
    for profile in Profile::ALL {
        let t = start(profile).await;
        let r = t.get("_apis/projects?api-version=7.1").await;
        if profile == Profile::Services {
            assert_eq!(r.status, 200);
        } else {
            assert_eq!(r.status, 400);
            let msg = r.json()["message"].as_str().unwrap_or("").to_string();
            assert_eq!(
                msg,
                format!("The requested REST API version of 7.1 is out of range for this server. The latest REST API version this server supports is {}.", profile.named_latest())
            );
            assert_eq!(parse_latest_supported(&msg), Some(profile.named_latest()));
            assert_eq!(r.json()["typeKey"], "VssVersionOutOfRangeException");
        }
        let ok = t
            .get(&format!("_apis/projects?api-version={}-preview.1", profile.latest()))
            .await;
        assert_eq!(ok.status, 200, "{profile}: -preview accepted");
        t.sim.shutdown().await;
    }
    assert_eq!(Profile::Server2019.latest(), Version { major: 5, minor: 0 });
}

#[tokio::test]
async fn pat_basic_auth_with_any_user_and_bare_401_otherwise() {
    let mut t = start(Profile::Services).await;
    let good = t.get("_apis/projects?api-version=7.1").await;
    assert_eq!(good.status, 200);
    t.auth = format!(
        "Basic {}",
        data_encoding::BASE64.encode(format!("anyone:{}", t.sim.pat).as_bytes())
    );
    assert_eq!(t.get("_apis/projects?api-version=7.1").await.status, 200);
    t.auth = format!("Basic {}", data_encoding::BASE64.encode(b"anyone:wrong"));
    let bad = t.get("_apis/projects?api-version=7.1").await;
    assert_eq!(bad.status, 401);
    assert!(bad.body.is_empty(), "no details in a 401");
    t.auth = String::new();
    assert_eq!(t.get("_apis/projects?api-version=7.1").await.status, 401);
    assert_eq!(t.sim.count("unauthorized"), 2);
}

#[tokio::test]
async fn create_read_update_with_computed_fields_rev_and_412_on_a_stale_rev() {
    let t = start(Profile::Services).await;
    let wi = t
        .create(
            "User%20Story",
            json!([
                add("/fields/System.Title", json!("Sign in")),
                add("/fields/System.Description", json!("<p>desc</p>")),
                add("/fields/System.Tags", json!("beta; alpha;Beta")),
            ]),
        )
        .await;
    let id = wi["id"].as_u64().expect("id");
    assert_eq!(wi["rev"], 1);
    let f = &wi["fields"];
    assert_eq!(f["System.WorkItemType"], "User Story");
    assert_eq!(f["System.TeamProject"], "Fabrikam");
    assert_eq!(f["System.AreaPath"], "Fabrikam");
    assert_eq!(f["System.IterationPath"], "Fabrikam");
    assert_eq!(f["System.State"], "New");
    assert_eq!(f["System.Tags"], "alpha; beta");
    assert_eq!(f["System.CreatedBy"]["uniqueName"], "sim.user@example.com");
    assert!(f["System.CreatedDate"].as_str().is_some_and(|d| d.ends_with('Z')));
    assert!(
        f.get("System.Id").is_none(),
        "id and rev are top-level, not fields, by default"
    );

    let get = t
        .get(&format!(
            "Fabrikam/_apis/wit/workitems/{id}?fields=System.Id,System.Title&api-version=7.1"
        ))
        .await
        .json();
    assert_eq!(get["fields"], json!({"System.Id": id, "System.Title": "Sign in"}));
    let both = t
        .get(&format!(
            "_apis/wit/workitems/{id}?fields=System.Title&$expand=all&api-version=7.1"
        ))
        .await;
    assert_eq!(both.status, 400, "fields and $expand together are refused");

    let url = format!("Fabrikam/_apis/wit/workitems/{id}?api-version=7.1");
    let ok = t
        .patch_doc("PATCH", &url, json!([{"op": "test", "path": "/rev", "value": 1}, {"op": "replace", "path": "/fields/System.State", "value": "Active"}]))
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["rev"], 2);
    assert_eq!(ok.json()["fields"]["System.State"], "Active");
    let stale = t
        .patch_doc(
            "PATCH",
            &url,
            json!([{"op": "test", "path": "/rev", "value": 1}, add("/fields/System.Title", json!("x"))]),
        )
        .await;
    assert_eq!(stale.status, 412);
    let body = stale.json();
    assert_eq!(body["$id"], "1");
    assert!(body["typeKey"].is_string() && body["errorCode"] == 0);
    assert_eq!(
        t.sim.item(id).map(|(rev, _)| rev),
        Some(2),
        "a failed test changes nothing"
    );

    let removed = t
        .patch_doc("PATCH", &url, json!([{"op": "remove", "path": "/fields/System.Tags"}]))
        .await
        .json();
    assert!(removed["fields"].get("System.Tags").is_none());
    assert_eq!(removed["rev"], 3);
    let old = t
        .get(&format!(
            "_apis/wit/workitems/{id}?asOf={}&api-version=7.1",
            f["System.CreatedDate"].as_str().unwrap_or("")
        ))
        .await
        .json();
    assert_eq!(old["rev"], 1, "asOf reads the revision current then");
    let wrong_ct = t
        .raw("PATCH", &url, Some("application/json"), b"[]".to_vec(), &[])
        .await;
    assert_eq!(wrong_ct.status, 415);
}

#[tokio::test]
async fn unknown_types_fields_states_and_read_only_fields_are_refused_in_the_service_shape() {
    let t = start(Profile::Server2022).await;
    let base = "Fabrikam/_apis/wit/workitems";
    let r = t
        .patch_doc(
            "POST",
            &format!("{base}/$Risk?api-version=7.0"),
            json!([add("/fields/System.Title", json!("t"))]),
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("VS402323: Work item type Risk does not exist"));
    let r = t
        .patch_doc(
            "POST",
            &format!("{base}/$Bug?api-version=7.0"),
            json!([
                add("/fields/System.Title", json!("t")),
                add("/fields/Custom.Nope", json!(1))
            ]),
        )
        .await;
    assert_eq!(r.status, 400);
    let b = r.json();
    assert_eq!(b["message"], "TF51535: Cannot find field Custom.Nope.");
    assert_eq!(b["typeKey"], "WorkItemTrackingFieldDefinitionNotFoundException");
    for k in ["$id", "innerException", "typeName", "errorCode", "eventId"] {
        assert!(b.get(k).is_some(), "error body has {k}");
    }
    let r = t
        .patch_doc("POST", &format!("{base}/$Bug?api-version=7.0"), json!([]))
        .await;
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("TF401320: Rule Error for field Title"));
    let id = t.create_titled("t").await;
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0"),
            json!([add("/fields/System.State", json!("Done"))]),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0&bypassRules=true"),
            json!([add("/fields/System.State", json!("Done"))]),
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "bypassRules skips the state rule: {}",
        String::from_utf8_lossy(&r.body)
    );
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0"),
            json!([add("/fields/System.Title", json!("t2"))]),
        )
        .await;
    assert_eq!(
        r.status, 400,
        "an item left in a state outside the rules needs bypassRules again"
    );
    t.patch_doc(
        "PATCH",
        &format!("{base}/{id}?api-version=7.0"),
        json!([add("/fields/System.State", json!("Active"))]),
    )
    .await;
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0"),
            json!([add("/fields/System.CreatedDate", json!("2020-01-01T00:00:00Z"))]),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0&bypassRules=true"),
            json!([add("/fields/System.CreatedDate", json!("2020-01-01T00:00:00Z"))]),
        )
        .await;
    assert_eq!(r.json()["fields"]["System.CreatedDate"], "2020-01-01T00:00:00Z");
    let before = t.sim.item(id).map(|(rev, _)| rev);
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0&validateOnly=true"),
            json!([add("/fields/System.Title", json!("v"))]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.sim.item(id).map(|(rev, _)| rev),
        before,
        "validateOnly stores nothing"
    );
    let r = t
        .patch_doc(
            "PATCH",
            &format!("{base}/{id}?api-version=7.0"),
            json!([add("/fields/System.AreaPath", json!("Other\\Team"))]),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(t.get(&format!("{base}/9999?api-version=7.0")).await.status, 404);
    assert_eq!(t.get("Nowhere/_apis/wit/workitems/1?api-version=7.0").await.status, 404);
}

#[tokio::test]
async fn relations_add_at_the_end_refuse_duplicates_and_remove_by_index() {
    let t = start(Profile::Services).await;
    let a = t.create_titled("a").await;
    let b = t.create_titled("b").await;
    let url = format!("_apis/wit/workitems/{a}?$expand=relations&api-version=7.1");
    let link = json!({"rel": "Hyperlink", "url": "https://example.com/x", "attributes": {"comment": "relay:PUB-1"}});
    let r = t.patch_doc("PATCH", &url, json!([add("/relations/-", link.clone()), add("/relations/-", json!({"rel": "System.LinkTypes.Related", "url": t.sim.url.clone() + &format!("/_apis/wit/workItems/{b}")}))])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rels = r.json()["relations"].as_array().cloned().unwrap_or_default();
    assert_eq!(rels.len(), 2);
    assert_eq!(rels[0]["attributes"]["comment"], "relay:PUB-1");
    assert_eq!(
        t.patch_doc("PATCH", &url, json!([add("/relations/-", link)]))
            .await
            .status,
        400,
        "duplicate relation"
    );
    let missing = json!({"rel": "System.LinkTypes.Related", "url": t.sim.url.clone() + "/_apis/wit/workItems/777"});
    assert_eq!(
        t.patch_doc("PATCH", &url, json!([add("/relations/-", missing)]))
            .await
            .status,
        404
    );
    let r = t
        .patch_doc("PATCH", &url, json!([{"op": "remove", "path": "/relations/0"}]))
        .await
        .json();
    assert_eq!(r["relations"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        t.patch_doc("PATCH", &url, json!([{"op": "remove", "path": "/relations/5"}]))
            .await
            .status,
        400
    );
    let plain = t.get(&format!("_apis/wit/workitems/{a}?api-version=7.1")).await.json();
    assert!(plain.get("relations").is_none(), "relations only with $expand");
}

#[tokio::test]
async fn work_item_links_are_mirrored_on_their_target() {
    let t = start(Profile::Services).await;
    let parent = t.create_titled("parent").await;
    let child = t.create_titled("child").await;
    let up = json!({"rel": "System.LinkTypes.Hierarchy-Reverse", "url": format!("{}/_apis/wit/workItems/{parent}", t.sim.url)});
    let r = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{child}?api-version=7.1"),
            json!([add("/relations/-", up)]),
        )
        .await;
    assert_eq!(r.status, 200);
    let p = t
        .get(&format!(
            "_apis/wit/workitems/{parent}?$expand=relations&api-version=7.1"
        ))
        .await
        .json();
    assert_eq!(p["rev"], 2, "the target gets a revision");
    assert_eq!(p["relations"][0]["rel"], "System.LinkTypes.Hierarchy-Forward");
    assert!(p["relations"][0]["url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("/workItems/{child}"))));
    t.patch_doc(
        "PATCH",
        &format!("_apis/wit/workitems/{child}?api-version=7.1"),
        json!([{"op": "remove", "path": "/relations/0"}]),
    )
    .await;
    let p = t
        .get(&format!(
            "_apis/wit/workitems/{parent}?$expand=relations&api-version=7.1"
        ))
        .await
        .json();
    assert_eq!((p["rev"].clone(), p["relations"].clone()), (json!(3), json!([])));
}

#[tokio::test]
async fn workitemsbatch_caps_at_200_ids_and_honours_fields_and_error_policy() {
    let t = start(Profile::Services).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(t.create_titled(&format!("item {i}")).await);
    }
    let r = t
        .post(
            "Fabrikam/_apis/wit/workitemsbatch?api-version=7.1",
            json!({"ids": ids, "fields": ["System.Id", "System.Title"]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let b = r.json();
    assert_eq!(b["count"], 3);
    assert_eq!(
        b["value"][1]["fields"],
        json!({"System.Id": ids[1], "System.Title": "item 1"})
    );
    let many: Vec<u64> = (1..=201).collect();
    let r = t
        .post("_apis/wit/workitemsbatch?api-version=7.1", json!({"ids": many}))
        .await;
    assert_eq!(r.status, 400);
    let r = t
        .post(
            "_apis/wit/workitemsbatch?api-version=7.1",
            json!({"ids": [ids[0], 999]}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = t
        .post(
            "_apis/wit/workitemsbatch?api-version=7.1",
            json!({"ids": [ids[0], 999], "errorPolicy": "omit"}),
        )
        .await
        .json();
    assert_eq!(r["value"][1], Value::Null);
    let list = t
        .get(&format!(
            "_apis/wit/workitems?ids={},{}&api-version=7.1",
            ids[0], ids[2]
        ))
        .await
        .json();
    assert_eq!(list["count"], 2);
}

#[tokio::test]
async fn wiql_filters_by_project_tags_state_and_changed_date_and_orders() {
    let t = start(Profile::Services).await;
    t.sim.create_project("Other");
    let mk = |title: &str, tags: &str, state: &str| {
        json!([
            add("/fields/System.Title", json!(title)),
            add("/fields/System.Tags", json!(tags)),
            add("/fields/System.State", json!(state))
        ])
    };
    let a = t.create("Task", mk("a", "sync; x", "New")).await["id"]
        .as_u64()
        .unwrap_or(0);
    let b = t.create("Task", mk("b", "sync", "Active")).await["id"]
        .as_u64()
        .unwrap_or(0);
    let _c = t.create("Task", mk("c", "syncing", "New")).await;
    let other = t
        .patch_doc(
            "POST",
            "Other/_apis/wit/workitems/$Task?api-version=7.1",
            mk("d", "sync", "New"),
        )
        .await;
    assert_eq!(other.status, 200);
    let q = |w: &str| json!({"query": format!("SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project AND {w} ORDER BY [System.Title] DESC")});
    let r = t
        .post(
            "Fabrikam/_apis/wit/wiql?api-version=7.1",
            q("[System.Tags] CONTAINS 'sync'"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ids: Vec<u64> = r.json()["workItems"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["id"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![b, a], "whole tags only, this project only, title descending");
    assert!(r.json()["workItems"][0]["url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("/_apis/wit/workItems/{b}"))));
    let r = t
        .post(
            "Fabrikam/Fabrikam%20Team/_apis/wit/wiql?api-version=7.1",
            q("[System.State] IN ('Active', 'Resolved') AND [System.ChangedDate] >= @today - 1"),
        )
        .await;
    assert_eq!(
        r.json()["workItems"].as_array().map(Vec::len),
        Some(1),
        "team segment accepted"
    );
    let r = t
        .post("Fabrikam/_apis/wit/wiql?api-version=7.1", q("[System.State] <> 'New'"))
        .await;
    assert_eq!(r.json()["workItems"].as_array().map(Vec::len), Some(1));
    let r = t
        .post("Fabrikam/_apis/wit/wiql?api-version=7.1", q("[Custom.Missing] = 1"))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap_or("").starts_with("TF51005"));
    let r = t
        .post(
            "Fabrikam/_apis/wit/wiql?api-version=7.1",
            q("[System.ChangedDate] >= '2020-01-01T10:00:00Z'"),
        )
        .await;
    assert_eq!(r.status, 400, "a time needs timePrecision");
    let r = t
        .post(
            "Fabrikam/_apis/wit/wiql?timePrecision=true&api-version=7.1",
            q("[System.ChangedDate] >= '2020-01-01T10:00:00Z'"),
        )
        .await;
    assert_eq!(r.json()["workItems"].as_array().map(Vec::len), Some(3));
    let all = t
        .post(
            "_apis/wit/wiql?api-version=7.1",
            json!({"query": "SELECT [System.Id] FROM WorkItems"}),
        )
        .await
        .json();
    assert_eq!(
        all["workItems"].as_array().map(Vec::len),
        Some(4),
        "collection-wide without a project clause"
    );
}

#[tokio::test]
async fn reporting_feed_pages_with_continuation_tokens_in_change_order() {
    let t = start(Profile::Server2019).await;
    let a = t
        .create(
            "Bug",
            json!([
                add("/fields/System.Title", json!("a")),
                add("/fields/System.Description", json!("<b>long</b>"))
            ]),
        )
        .await["id"]
        .as_u64()
        .unwrap_or(0);
    let b = t.create_titled("b").await;
    for title in ["a2", "a3"] {
        let r = t
            .patch_doc(
                "PATCH",
                &format!("_apis/wit/workitems/{a}?api-version=5.0"),
                json!([add("/fields/System.Title", json!(title))]),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let mut seen = Vec::new();
    let mut path = "Fabrikam/_apis/wit/reporting/workitemrevisions?$maxPageSize=2&api-version=5.0".to_string();
    let token = loop {
        let page = t.get(&path).await.json();
        for v in page["values"].as_array().cloned().unwrap_or_default() {
            assert!(
                v["fields"].get("System.Description").is_none(),
                "long text left out by default"
            );
            assert_eq!(v["fields"]["System.Id"], v["id"]);
            seen.push((v["id"].as_u64().unwrap_or(0), v["rev"].as_u64().unwrap_or(0)));
        }
        let token = page["continuationToken"].as_str().unwrap_or("").to_string();
        assert!(page["nextLink"]
            .as_str()
            .is_some_and(|l| l.contains("continuationToken=")));
        if page["isLastBatch"] == true {
            break token;
        }
        path = format!(
            "Fabrikam/_apis/wit/reporting/workitemrevisions?$maxPageSize=2&continuationToken={token}&api-version=5.0"
        );
    };
    assert_eq!(seen, vec![(a, 1), (b, 1), (a, 2), (a, 3)]);
    let empty = t
        .get(&format!(
            "_apis/wit/reporting/workitemrevisions?continuationToken={token}&api-version=5.0"
        ))
        .await
        .json();
    assert_eq!(empty["values"], json!([]));
    assert_eq!(empty["isLastBatch"], true);
    assert_eq!(
        empty["continuationToken"],
        token.as_str(),
        "an empty page keeps the watermark"
    );
    t.patch_doc(
        "PATCH",
        &format!("_apis/wit/workitems/{b}?api-version=5.0"),
        json!([add("/fields/System.Title", json!("b2"))]),
    )
    .await;
    let next = t
        .get(&format!(
            "Fabrikam/_apis/wit/reporting/workitemrevisions?continuationToken={token}&$expand=fields&api-version=5.0"
        ))
        .await
        .json();
    assert_eq!(next["values"].as_array().map(Vec::len), Some(1));
    assert_eq!(next["values"][0]["rev"], 2);
    let first = t
        .get("_apis/wit/reporting/workitemrevisions?$expand=fields&api-version=5.0")
        .await
        .json();
    assert_eq!(
        first["values"][0]["fields"]["System.Description"], "<b>long</b>",
        "$expand=fields brings long text"
    );
    assert_eq!(
        first["values"][0]["fields"]["System.RevisedDate"],
        first["values"][2]["fields"]["System.ChangedDate"]
    );
    assert!(first["values"][0]["fields"]["System.CreatedBy"]
        .as_str()
        .is_some_and(|s| s.ends_with("<sim.user@example.com>")));
    let latest = t
        .get("_apis/wit/reporting/workitemrevisions?includeLatestOnly=true&fields=System.Title&api-version=5.0")
        .await
        .json();
    let revs: Vec<(u64, u64)> = latest["values"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|v| (v["id"].as_u64().unwrap_or(0), v["rev"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(revs, vec![(a, 3), (b, 2)]);
    assert_eq!(latest["values"][0]["fields"], json!({"System.Title": "a3"}));
    let posted = t
        .post(
            "_apis/wit/reporting/workitemrevisions?api-version=5.0",
            json!({"fields": ["System.Title"], "types": ["Bug"]}),
        )
        .await
        .json();
    assert_eq!(
        posted["values"].as_array().map(Vec::len),
        Some(3),
        "only the bug's revisions"
    );
    let refs = t
        .get("_apis/wit/reporting/workitemrevisions?includeIdentityRef=true&$maxPageSize=1&api-version=5.0")
        .await
        .json();
    // An identity reference, as work item reads carry it.
    assert_eq!(
        refs["values"][0]["fields"]["System.CreatedBy"]["uniqueName"],
        "sim.user@example.com"
    );
    assert_eq!(
        refs["values"][0]["fields"]["System.CreatedBy"]["displayName"],
        "Sim User"
    );
    assert!(refs["values"][0]["fields"]["System.CreatedBy"]["id"].is_string());
    let since = first["values"][1]["fields"]["System.ChangedDate"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let later = t
        .get(&format!(
            "_apis/wit/reporting/workitemrevisions?startDateTime={since}&api-version=5.0"
        ))
        .await
        .json();
    assert_eq!(
        later["values"].as_array().map(Vec::len),
        Some(3),
        "revisions after the start instant"
    );
    let bad = t
        .get("_apis/wit/reporting/workitemrevisions?continuationToken=garbage&api-version=5.0")
        .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn comments_api_on_services_adds_lists_edits_deletes_with_format_and_revisions() {
    let t = start(Profile::Services).await;
    let id = t.create_titled("c").await;
    let base = format!("Fabrikam/_apis/wit/workItems/{id}/comments");
    let r = t
        .post(&format!("{base}?api-version=7.1"), json!({"text": "no preview"}))
        .await;
    assert_eq!(r.status, 400, "comments need -preview");
    let r = t
        .post(
            &format!("{base}?format=markdown&api-version=7.1-preview.4"),
            json!({"text": "**hi** <you>"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let c1 = r.json();
    assert_eq!(c1["format"], "markdown");
    assert_eq!(c1["version"], 1);
    assert_eq!(c1["createdBy"]["uniqueName"], "sim.user@example.com");
    assert!(c1["renderedText"].as_str().is_some_and(|h| h.contains("&lt;you&gt;")));
    let c1id = c1["id"].as_u64().unwrap_or(0);
    let wi = t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.json();
    assert_eq!(wi["rev"], 2, "a comment is a revision");
    assert_eq!(wi["fields"]["System.CommentCount"], 1);
    let r = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            json!([add("/fields/System.History", json!("<p>via history</p>"))]),
        )
        .await;
    assert_eq!(r.status, 200);
    let same = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            json!([add("/fields/System.Title", json!("c"))]),
        )
        .await;
    assert_eq!(
        same.json()["rev"],
        3,
        "an unchanged title after a history write makes no revision"
    );
    let list = t.get(&format!("{base}?api-version=7.1-preview.4")).await.json();
    assert_eq!(list["totalCount"], 2);
    assert_eq!(list["comments"][1]["text"], "<p>via history</p>");
    assert_eq!(list["comments"][1]["format"], "html");
    let page = t
        .get(&format!("{base}?$top=1&order=desc&api-version=7.1-preview.4"))
        .await
        .json();
    assert_eq!(page["count"], 1);
    assert_eq!(page["comments"][0]["text"], "<p>via history</p>");
    let token = page["continuationToken"].as_str().unwrap_or("").to_string();
    let page2 = t
        .get(&format!(
            "{base}?$top=1&order=desc&continuationToken={token}&api-version=7.1-preview.4"
        ))
        .await
        .json();
    assert_eq!(page2["comments"][0]["id"], c1id);
    assert!(page2.get("continuationToken").is_none());
    let r = t
        .raw(
            "PATCH",
            &format!("{base}/{c1id}?api-version=7.1-preview.4"),
            Some("application/json"),
            json!({"text": "edited"}).to_string().into_bytes(),
            &[],
        )
        .await;
    assert_eq!(r.json()["version"], 2);
    assert_eq!(r.json()["text"], "edited");
    let r = t
        .raw(
            "DELETE",
            &format!("{base}/{c1id}?api-version=7.1-preview.4"),
            None,
            Vec::new(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.get(&format!("{base}/{c1id}?api-version=7.1-preview.4")).await.status,
        404
    );
    let del = t
        .get(&format!("{base}/{c1id}?includeDeleted=true&api-version=7.1-preview.4"))
        .await
        .json();
    assert_eq!(del["isDeleted"], true);
    let wi = t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.json();
    assert_eq!(wi["rev"], 5);
    assert_eq!(wi["fields"]["System.CommentCount"], 1);
    assert_eq!(wi["commentVersionRef"]["isDeleted"], true);
    assert_eq!(t.sim.comment_texts(id), vec!["<p>via history</p>".to_string()]);
}

#[tokio::test]
async fn comments_differ_per_profile_2022_has_no_format_and_2019_is_read_only_history() {
    let t = start(Profile::Server2022).await;
    let id = t.create_titled("c").await;
    let r = t
        .post(
            &format!("Fabrikam/_apis/wit/workItems/{id}/comments?format=markdown&api-version=7.0-preview.3"),
            json!({"text": "x"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("format").is_none(), "7.0 comments have no format");
    assert!(r.json().get("renderedText").is_none(), "nor renderedText");
    t.sim.shutdown().await;

    let t = start(Profile::Server2019).await;
    let id = t.create_titled("c").await;
    let base = format!("Fabrikam/_apis/wit/workItems/{id}/comments");
    let r = t
        .post(&format!("{base}?api-version=5.0-preview.2"), json!({"text": "x"}))
        .await;
    assert_eq!(r.status, 405, "no comment writes on 5.0");
    for text in ["first", "second"] {
        let r = t
            .patch_doc(
                "PATCH",
                &format!("_apis/wit/workitems/{id}?api-version=5.0"),
                json!([add("/fields/System.History", json!(text))]),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let list = t.get(&format!("{base}?api-version=5.0-preview.2")).await.json();
    assert_eq!(list["totalCount"], 2);
    assert_eq!(list["comments"][0]["revision"], 2);
    assert_eq!(list["comments"][1]["text"], "second");
    assert_eq!(list["comments"][0]["revisedBy"]["uniqueName"], "sim.user@example.com");
    assert_eq!(t.sim.add_comment_as_human(id, "third"), Ok(4));
    let seeded = t
        .sim
        .create_item("Fabrikam", "Bug", &[add("/fields/System.Title", json!("seeded"))])
        .expect("seeded");
    assert_eq!(
        t.sim.item(seeded).map(|(_, f)| f["System.CreatedBy"].clone()),
        Some(json!("Human Editor <human.editor@example.com>"))
    );
    let from3 = t
        .get(&format!("{base}?fromRevision=3&api-version=5.0-preview.2"))
        .await
        .json();
    assert_eq!(from3["count"], 2);
    let one = t.get(&format!("{base}/2?api-version=5.0-preview.2")).await.json();
    assert_eq!(one["text"], "first");
    let r = t.get(&format!("{base}?api-version=7.1-preview.4")).await;
    assert_eq!(r.status, 400);
    t.sim.shutdown().await;

    let t = start(Profile::Server2022).await;
    let id = t.create_titled("old client").await;
    t.patch_doc(
        "PATCH",
        &format!("_apis/wit/workitems/{id}?api-version=7.0"),
        json!([add("/fields/System.History", json!("h"))]),
    )
    .await;
    let old = t
        .get(&format!(
            "Fabrikam/_apis/wit/workItems/{id}/comments?api-version=5.0-preview.2"
        ))
        .await
        .json();
    assert_eq!(
        old["comments"][0]["revision"], 2,
        "a 5.0 client gets the 5.0 view from a newer server"
    );
    let new = t
        .get(&format!(
            "Fabrikam/_apis/wit/workItems/{id}/comments?api-version=7.0-preview.3"
        ))
        .await
        .json();
    assert_eq!(new["comments"][0]["text"], "h");
}

#[tokio::test]
async fn attachments_simple_and_chunked_upload_download_and_attach() {
    let t = start(Profile::Services).await;
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let r = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=a.bin&api-version=7.1",
            Some("application/octet-stream"),
            data.clone(),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    let simple = r.json();
    let aid = simple["id"].as_str().unwrap_or("").to_string();
    assert!(simple["url"]
        .as_str()
        .is_some_and(|u| u.contains(&format!("/_apis/wit/attachments/{aid}"))));
    let got = t.get(&format!("_apis/wit/attachments/{aid}?api-version=7.1")).await;
    assert_eq!(got.body.as_ref(), data.as_slice());

    let r = t
        .raw(
            "POST",
            "_apis/wit/attachments?fileName=big.zip&uploadType=Chunked&api-version=7.1",
            Some("application/octet-stream"),
            Vec::new(),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    let cid = r.json()["id"].as_str().unwrap_or("").to_string();
    assert_eq!(put_chunk(&t, &cid, &data, 0, 3999).await.status, 201);
    assert_eq!(
        put_chunk(&t, &cid, &data, 8000, 9999).await.status,
        400,
        "chunks arrive in order"
    );
    assert_eq!(
        t.get(&format!("_apis/wit/attachments/{cid}?api-version=7.1"))
            .await
            .status,
        404,
        "incomplete"
    );
    assert_eq!(put_chunk(&t, &cid, &data, 4000, 7999).await.status, 201);
    assert_eq!(put_chunk(&t, &cid, &data, 8000, 9999).await.status, 201);
    assert_eq!(t.sim.attachment_bytes(&cid), Some(data.clone()));

    let id = t.create_titled("with file").await;
    let url = simple["url"].as_str().unwrap_or("").to_string();
    let r = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?$expand=relations&api-version=7.1"),
            json!([add(
                "/relations/-",
                json!({"rel": "AttachedFile", "url": url, "attributes": {"comment": "sha256:x"}})
            )]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rel = &r.json()["relations"][0];
    assert_eq!(rel["attributes"]["name"], "a.bin");
    assert_eq!(rel["attributes"]["resourceSize"], 10_000);
    let bogus = json!({"rel": "AttachedFile", "url": format!("{}/_apis/wit/attachments/00000000-0000-0000-0000-000000000000", t.sim.url)});
    assert_eq!(
        t.patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            json!([add("/relations/-", bogus)])
        )
        .await
        .status,
        400
    );

    t.sim.set_profile(Profile::Server2019);
    let five_mb = vec![0u8; 5 * 1024 * 1024];
    let r = t
        .raw(
            "POST",
            "_apis/wit/attachments?fileName=big&api-version=5.0",
            Some("application/octet-stream"),
            five_mb,
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "Server's 4 MB default for a whole attachment");
    assert!(r.json()["message"].as_str().unwrap_or("").starts_with("TF237082"));
}

#[tokio::test]
async fn injected_429_and_503_carry_retry_after_then_clear() {
    let t = start(Profile::Services).await;
    t.sim.inject_429(2, 7);
    for _ in 0..2 {
        let r = t.get("_apis/projects?api-version=7.1").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
        assert!(r.headers.contains_key("x-ratelimit-resource") && r.headers.contains_key("x-ratelimit-reset"));
        assert!(r.json()["message"].as_str().unwrap_or("").starts_with("TF400733"));
    }
    assert_eq!(t.get("_apis/projects?api-version=7.1").await.status, 200);
    t.sim.inject_503(1, 3);
    let r = t.get("_apis/projects?api-version=7.1").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("3"));
    assert_eq!(t.get("_apis/projects?api-version=7.1").await.status, 200);
    t.sim.inject_rate_limit_warning(1, 2);
    let r = t.get("_apis/projects?api-version=7.1").await;
    assert_eq!(r.status, 200, "delayed mode still answers");
    assert_eq!(r.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    assert!(r.headers.get("x-ratelimit-delay").is_some_and(|v| v != "0.000"));
    assert!(t
        .get("_apis/projects?api-version=7.1")
        .await
        .headers
        .get("retry-after")
        .is_none());
    let id = t.create_titled("scoped").await;
    t.sim.inject_429_on("workitems.update", 1, 1);
    assert_eq!(
        t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.status,
        200,
        "reads pass"
    );
    let url = format!("_apis/wit/workitems/{id}?api-version=7.1");
    assert_eq!(
        t.patch_doc("PATCH", &url, json!([add("/fields/System.Title", json!("w"))]))
            .await
            .status,
        429
    );
    assert_eq!(
        t.patch_doc("PATCH", &url, json!([add("/fields/System.Title", json!("w"))]))
            .await
            .status,
        200
    );
    assert_eq!(t.sim.count("fault.429"), 3);
    t.sim.inject_429(0, 0);
    assert_eq!(t.sim.count("fault.503"), 1);
    let r = t
        .control("faults", json!({"status": 503, "count": 1, "endpoint": "wiql"}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(t.get("_apis/projects?api-version=7.1").await.status, 200);
    let q = json!({"query": "SELECT [System.Id] FROM WorkItems"});
    assert_eq!(t.post("_apis/wit/wiql?api-version=7.1", q).await.status, 503);
}

#[tokio::test]
async fn a_human_edit_between_read_and_write_makes_the_write_412() {
    let t = start(Profile::Services).await;
    let id = t.create_titled("shared").await;
    t.sim
        .edit_after_next_read(id, vec![add("/fields/System.Title", json!("human title"))]);
    let read = t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.json();
    assert_eq!(read["rev"], 1, "the read answers the state before the edit");
    let rev = read["rev"].clone();
    let w = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            json!([{"op": "test", "path": "/rev", "value": rev}, add("/fields/System.Title", json!("mine"))]),
        )
        .await;
    assert_eq!(w.status, 412);
    let (rev, fields) = t.sim.item(id).expect("item");
    assert_eq!(rev, 2);
    assert_eq!(fields["System.Title"], "human title");
    assert_eq!(fields["System.ChangedBy"], "Human Editor <human.editor@example.com>");
    assert_eq!(
        t.sim.edit_as_human(id, &[add("/fields/System.Title", json!("again"))]),
        Ok(3)
    );
}

#[tokio::test]
async fn service_hooks_post_created_updated_and_commented_with_the_secret_header() {
    use std::sync::Mutex;
    // What the hook receiver saw: the secret header and the JSON body of each POST.
    type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;
    let got: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let secret = req
                            .headers()
                            .get("x-relay-secret")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push((secret, v));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let t = start(Profile::Services).await;
    t.sim
        .subscribe(&format!("http://{addr}/hook"), Some(("x-relay-secret", "s3cret")), &[]);
    let id = t.create_titled("hooked").await;
    t.patch_doc(
        "PATCH",
        &format!("_apis/wit/workitems/{id}?api-version=7.1"),
        json!([add("/fields/System.History", json!("a note"))]),
    )
    .await;
    let gone = t
        .raw(
            "DELETE",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            None,
            Vec::new(),
            &[],
        )
        .await;
    assert_eq!(gone.status, 200);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.lock().map(|g| g.len()).unwrap_or(0) < 4 {
        assert!(tokio::time::Instant::now() < deadline, "three events arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = got.lock().map(|g| g.clone()).unwrap_or_default();
    let mut kinds: Vec<&str> = events.iter().filter_map(|(_, v)| v["eventType"].as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "workitem.commented",
            "workitem.created",
            "workitem.deleted",
            "workitem.updated"
        ]
    );
    assert!(events.iter().all(|(s, v)| s.as_deref() == Some("s3cret")
        && v["publisherId"] == "tfs"
        && v["resourceContainers"]["project"]["id"].is_string()));
    let updated = events
        .iter()
        .find(|(_, v)| v["eventType"] == "workitem.updated")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert_eq!(updated["resource"]["workItemId"], id);
    assert_eq!(updated["resource"]["fields"]["System.Rev"]["newValue"], 2);
    while t.sim.hook_deliveries().0 < 4 {
        assert!(tokio::time::Instant::now() < deadline, "deliveries are counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tls_with_the_handle_ca_and_control_api_and_counters() {
    let sim = Sim::start(SimOptions {
        tls: true,
        ..SimOptions::default()
    })
    .await
    .expect("start");
    assert!(sim.url.starts_with("https://localhost:"));
    let mut roots = rustls::RootCertStore::empty();
    let pem = sim.ca_pem.clone().expect("ca");
    let der = pem_to_der(&pem);
    roots.add(rustls::pki_types::CertificateDer::from(der)).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(sim.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let req = hyper::Request::post("/_sim/projects")
        .header("host", "localhost")
        .header("authorization", sim.auth_header())
        .body(Full::new(Bytes::from(json!({"name": "Contoso"}).to_string())))
        .expect("req");
    let r = send.send_request(req).await.expect("resp");
    assert_eq!(r.status(), 200);
    let coll = sim.url.rsplit('/').next().unwrap_or("").to_string();
    let req = hyper::Request::get(format!("/{coll}/_apis/projects/Contoso?api-version=7.1"))
        .header("host", "localhost")
        .header("authorization", sim.auth_header())
        .body(Full::new(Bytes::new()))
        .expect("req");
    let r = send.send_request(req).await.expect("resp");
    assert_eq!(r.status(), 200);
    let body: Value =
        serde_json::from_slice(&r.into_body().collect().await.expect("body").to_bytes()).unwrap_or(Value::Null);
    assert_eq!(body["name"], "Contoso");
    assert_eq!(sim.count("projects.get"), 1);
    assert_eq!(sim.count("control"), 1);
    sim.shutdown().await;
}

use std::sync::Arc;

async fn put_chunk(t: &T, cid: &str, data: &[u8], start: usize, end: usize) -> Resp {
    let range = format!("bytes {start}-{end}/{}", data.len());
    let path = format!("_apis/wit/attachments/{cid}?uploadType=Chunked&api-version=7.1");
    t.raw(
        "PUT",
        &path,
        Some("application/octet-stream"),
        data[start..=end].to_vec(),
        &[("content-range", range.as_str())],
    )
    .await
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    data_encoding::BASE64.decode(b64.as_bytes()).expect("pem")
}

#[tokio::test]
async fn version_in_the_accept_header_missing_versions_and_the_human_pat() {
    let mut t = start(Profile::Server2020).await;
    let r = t
        .raw(
            "GET",
            "_apis/projects",
            None,
            Vec::new(),
            &[("accept", "application/json; api-version=7.0")],
        )
        .await;
    assert_eq!(r.status, 400, "the Accept header's version is gated too");
    assert_eq!(
        parse_latest_supported(r.json()["message"].as_str().unwrap_or("")),
        Some(Version { major: 6, minor: 1 })
    );
    let r = t
        .raw(
            "GET",
            "_apis/projects",
            None,
            Vec::new(),
            &[("accept", "application/json; api-version=6.0")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.get("_apis/projects").await.status,
        200,
        "GET without a version gets the default"
    );
    let r = t
        .patch_doc(
            "POST",
            "Fabrikam/_apis/wit/workitems/$Task",
            json!([add("/fields/System.Title", json!("t"))]),
        )
        .await;
    assert_eq!(r.status, 400, "writes need a version");
    assert_eq!(r.json()["typeKey"], "VssVersionNotSpecifiedException");
    t.auth = format!(
        "Basic {}",
        data_encoding::BASE64.encode(format!(":{}", t.sim.human_pat()).as_bytes())
    );
    let wi = t
        .create("Task", json!([add("/fields/System.Title", json!("by a person"))]))
        .await;
    assert_eq!(wi["fields"]["System.CreatedBy"]["displayName"], "Human Editor");
}

#[tokio::test]
async fn revisions_types_fields_and_delete() {
    let t = start(Profile::Services).await;
    let id = t.create_titled("r").await;
    t.patch_doc(
        "PATCH",
        &format!("_apis/wit/workitems/{id}?api-version=7.1"),
        json!([add("/fields/System.Title", json!("r2"))]),
    )
    .await;
    let revs = t
        .get(&format!("_apis/wit/workItems/{id}/revisions?api-version=7.1"))
        .await
        .json();
    assert_eq!(revs["count"], 2);
    assert_eq!(revs["value"][0]["fields"]["System.Title"], "r");
    let types = t.get("Fabrikam/_apis/wit/workitemtypes?api-version=7.1").await.json();
    assert!(types["value"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["name"] == "User Story")));
    let bug = t
        .get("Fabrikam/_apis/wit/workitemtypes/bug?api-version=7.1")
        .await
        .json();
    assert_eq!(bug["states"][0]["name"], "New");
    let fields = t.get("_apis/wit/fields?api-version=7.1").await.json();
    assert!(fields["value"]
        .as_array()
        .is_some_and(|a| a.iter().any(|f| f["referenceName"] == "System.Tags")));
    t.sim.add_field("Custom.RemoteKey", ado_sim::Kind::String);
    let r = t
        .patch_doc(
            "PATCH",
            &format!("_apis/wit/workitems/{id}?api-version=7.1"),
            json!([add("/fields/Custom.RemoteKey", json!("PUB-7"))]),
        )
        .await;
    assert_eq!(r.json()["fields"]["Custom.RemoteKey"], "PUB-7");
    let q = json!({"query": "SELECT [System.Id] FROM WorkItems WHERE [Custom.RemoteKey] = 'PUB-7'"});
    assert_eq!(
        t.post("_apis/wit/wiql?api-version=7.1", q).await.json()["workItems"][0]["id"],
        id
    );
    let r = t
        .raw(
            "DELETE",
            &format!("Fabrikam/_apis/wit/workitems/{id}?api-version=7.1"),
            None,
            Vec::new(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.status,
        404
    );
    let feed = t
        .get("_apis/wit/reporting/workitemrevisions?api-version=7.1")
        .await
        .json();
    assert_eq!(feed["values"], json!([]), "deleted items leave the feed");
    let feed = t
        .get("_apis/wit/reporting/workitemrevisions?includeDeleted=true&api-version=7.1")
        .await
        .json();
    assert_eq!(feed["values"].as_array().map(Vec::len), Some(3));
    assert!(t.sim.item_ids(Some("Fabrikam")).is_empty());
}

#[tokio::test]
async fn a_collection_path_of_several_segments_as_older_servers_have() {
    let sim = Sim::start(SimOptions {
        profile: Profile::Server2019,
        collection: Some("tfs/DefaultCollection".into()),
        projects: vec!["Fabrikam".into()],
        ..SimOptions::default()
    })
    .await
    .expect("start");
    assert!(sim.url.ends_with("/tfs/DefaultCollection"));
    let t = T {
        auth: sim.auth_header(),
        http: Client::builder(TokioExecutor::new()).build_http(),
        sim,
    };
    let id = t.create_titled("deep").await;
    assert_eq!(
        t.get(&format!("Fabrikam/_apis/wit/workitems/{id}?api-version=5.0"))
            .await
            .status,
        200
    );
    let r = t.get("_apis/projects/Fabrikam?api-version=5.0").await;
    assert_eq!(r.json()["name"], "Fabrikam");
}

#[test]
fn the_binary_explains_itself() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ado-sim"))
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--profile", "--pat-file", "--project", "--tls-ca-out"] {
        assert!(text.contains(flag), "--help mentions {flag}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_ado-sim"))
        .args(["--profile", "tfs-2015"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown profile"));
}

#[tokio::test]
async fn server_2020_names_6_1_and_serves_it_only_as_a_preview() {
    let t = start(Profile::Server2020).await;
    let r = t.get("_apis/projects?api-version=7.0").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        parse_latest_supported(r.json()["message"].as_str().unwrap_or("")),
        Some(Version { major: 6, minor: 1 })
    );
    let r = t.get("_apis/projects?api-version=6.1").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["typeKey"], "VssInvalidPreviewVersionException");
    assert!(r.json()["message"].as_str().unwrap_or("").contains("\"6.1-preview\""));
    assert_eq!(t.get("_apis/projects?api-version=6.1-preview").await.status, 200);
    assert_eq!(t.get("_apis/projects?api-version=6.0").await.status, 200);
    t.sim.shutdown().await;
}

/// Sends a control request with any method.
async fn control_with(t: &T, method: &str, path: &str, v: Value) -> Resp {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}/_sim/{path}", t.sim.addr))
        .header("authorization", &t.auth)
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("request");
    let resp = t.http.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp { status, headers, body }
}

#[tokio::test]
async fn faults_over_the_control_api_hold_fail_after_commit_slow_commits_limit_and_canonical_host() {
    let t = std::sync::Arc::new(start(Profile::Services).await);

    // 502 after commit: the item exists, the answer is a gateway's.
    let r = t
        .control(
            "fail-after-commit",
            json!({"endpoint": "workitems.create", "status": 502, "count": 1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = t
        .patch_doc(
            "POST",
            "Fabrikam/_apis/wit/workitems/$Task?api-version=7.1",
            json!([add("/fields/System.Title", json!("committed"))]),
        )
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(t.sim.item_ids(Some("Fabrikam")).len(), 1, "the create took effect");
    assert_eq!(t.sim.count("fault.502.after-commit"), 1);
    let id = t.create_titled("answered").await;
    assert_eq!(t.sim.item_ids(Some("Fabrikam")).len(), 2, "one call only");
    assert_eq!(
        t.control(
            "fail-after-commit",
            json!({"endpoint": "workitems.create", "status": 500})
        )
        .await
        .status,
        400,
        "only gateway statuses"
    );

    // 504 on comments.add.
    t.control(
        "fail-after-commit",
        json!({"endpoint": "comments.add", "status": 504, "count": 1}),
    )
    .await;
    let path = format!("Fabrikam/_apis/wit/workItems/{id}/comments?api-version=7.1-preview.4");
    assert_eq!(t.post(&path, json!({"text": "once"})).await.status, 504);
    assert_eq!(t.sim.comment_texts(id), ["once"]);

    // Hold and release over HTTP: the update takes effect, its answer waits.
    assert_eq!(
        t.control("hold", json!({"endpoint": "workitems.update"})).await.status,
        200
    );
    let held = {
        let t = t.clone();
        tokio::spawn(async move {
            t.patch_doc(
                "PATCH",
                &format!("_apis/wit/workitems/{id}?api-version=7.1"),
                json!([add("/fields/System.Title", json!("held"))]),
            )
            .await
            .status
        })
    };
    let until = tokio::time::Instant::now() + DEADLINE;
    while t.sim.count("workitems.update.held") == 0 {
        assert!(tokio::time::Instant::now() < until, "the answer was never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        t.sim.item(id).map(|(_, f)| f["System.Title"].clone()),
        Some(json!("held"))
    );
    assert!(!held.is_finished());
    assert_eq!(
        t.control("release", json!({"endpoint": "workitems.update"}))
            .await
            .status,
        200
    );
    assert_eq!(
        tokio::time::timeout(DEADLINE, held)
            .await
            .expect("released")
            .expect("task"),
        200
    );
    assert_eq!(t.control("hold", json!({})).await.status, 400, "needs an endpoint");

    // Slow commits.
    t.control("slow-commits", json!({"endpoint": "workitems.get", "delayMs": 300}))
        .await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(t.sim.count("workitems.get.slow"), 1);
    t.control("slow-commits", json!({"endpoint": "workitems.get", "delayMs": 0}))
        .await;
    t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await;
    assert_eq!(t.sim.count("workitems.get.slow"), 1, "stopped");

    // The attachment size limit, for the whole file, in the server's words.
    let r = control_with(&t, "PUT", "attachment-limit", json!({"bytes": 1024})).await;
    assert_eq!(r.json()["bytes"], 1024);
    let r = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=big.bin&api-version=7.1",
            Some("application/octet-stream"),
            vec![0; 2048],
            &[],
        )
        .await;
    assert_eq!(r.status, 400);
    let msg = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        msg.starts_with(
            "TF237082: The file you are trying to upload exceeds the supported file upload size (0.001 MB(s))"
        ),
        "{msg}"
    );
    let started = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=big.bin&uploadType=Chunked&api-version=7.1",
            Some("application/octet-stream"),
            Vec::new(),
            &[],
        )
        .await
        .json();
    let cid = started["id"].as_str().expect("id").to_string();
    let chunk = t
        .raw(
            "PUT",
            &format!("Fabrikam/_apis/wit/attachments/{cid}?api-version=7.1"),
            Some("application/octet-stream"),
            vec![0; 512],
            &[("content-range", "bytes 0-511/2048")],
        )
        .await;
    assert_eq!(chunk.status, 400, "the whole file counts, not the chunk");
    let r = control_with(&t, "PUT", "attachment-limit", json!({"bytes": null})).await;
    assert_eq!(r.json()["bytes"], 130 * 1024 * 1024, "the profile's default");

    // A canonical host: answers name it; connection data lists both.
    let r = control_with(
        &t,
        "PUT",
        "canonical",
        json!({"url": "https://fabrikam.visualstudio.com/"}),
    )
    .await;
    assert_eq!(r.json()["url"], "https://fabrikam.visualstudio.com");
    let item = t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.json();
    assert_eq!(
        item["url"],
        format!("https://fabrikam.visualstudio.com/_apis/wit/workItems/{id}")
    );
    let up = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=a.txt&api-version=7.1",
            Some("application/octet-stream"),
            b"abc".to_vec(),
            &[],
        )
        .await
        .json();
    assert!(up["url"]
        .as_str()
        .unwrap_or("")
        .starts_with("https://fabrikam.visualstudio.com/_apis/wit/attachments/"));
    let cd = t
        .get("_apis/connectionData?connectOptions=1&api-version=7.1-preview")
        .await
        .json();
    let points: Vec<&str> = cd["locationServiceData"]["accessMappings"]
        .as_array()
        .expect("access mappings")
        .iter()
        .filter_map(|m| m["accessPoint"].as_str())
        .collect();
    assert_eq!(points, ["https://fabrikam.visualstudio.com", t.sim.url.as_str()]);
    control_with(&t, "PUT", "canonical", json!({"url": null})).await;
    let item = t.get(&format!("_apis/wit/workitems/{id}?api-version=7.1")).await.json();
    assert_eq!(item["url"], format!("{}/_apis/wit/workItems/{id}", t.sim.url));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn server_profiles_limit_a_whole_attachment_to_4_mb_by_default() {
    let t = start(Profile::Server2022).await;
    let r = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=big.bin&api-version=7.0",
            Some("application/octet-stream"),
            vec![0; 4 * 1024 * 1024 + 1],
            &[],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap_or("").contains("(4.000 MB(s))"));
    t.sim.set_attachment_limit(8 * 1024 * 1024);
    let r = t
        .raw(
            "POST",
            "Fabrikam/_apis/wit/attachments?fileName=big.bin&uploadType=Chunked&api-version=7.0",
            Some("application/octet-stream"),
            Vec::new(),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    t.sim.shutdown().await;
}

/// Every described operation, called as the specification describes it on each profile,
/// answers as the description says (`spec/operations.json`), and `GET /_sim/conformance`
/// reports the same as the handle.
#[tokio::test]
async fn every_described_operation_answers_as_the_specification_describes_on_each_profile() {
    for profile in Profile::ALL {
        let t = start(profile).await;
        let v = profile.latest();
        let c = if profile.has_comments_api() {
            format!(
                "{v}-preview.{}",
                if v >= (Version { major: 7, minor: 1 }) { 4 } else { 3 }
            )
        } else {
            format!("{v}-preview.2")
        };
        let id = t.create_titled("swept").await;
        t.sim.add_comment_as_human(id, "a comment").unwrap();
        let ok = |r: &Resp, what: &str| {
            assert!(
                (200..300).contains(&r.status),
                "{profile:?} {what}: {}",
                String::from_utf8_lossy(&r.body)
            )
        };
        for path in [
            format!("_apis/connectionData?connectOptions=1&api-version={v}-preview"),
            format!("_apis/projects?$top=1&api-version={v}"),
            format!("_apis/projects/Fabrikam?api-version={v}"),
            format!("_apis/wit/fields?api-version={v}"),
            format!("Fabrikam/_apis/wit/workitemtypes?api-version={v}"),
            format!("Fabrikam/_apis/wit/workitemtypes/Task?api-version={v}"),
            format!("_apis/wit/workitems/{id}?$expand=all&api-version={v}"),
            format!("_apis/wit/workitems?ids={id},999&errorPolicy=omit&api-version={v}"),
            format!("_apis/wit/workitems/{id}/revisions?$expand=relations&api-version={v}"),
            format!(
                "Fabrikam/_apis/wit/reporting/workitemrevisions?includeIdentityRef=true&$expand=fields&api-version={v}"
            ),
            format!("Fabrikam/_apis/wit/workItems/{id}/comments?$top=5&order=desc&api-version={c}"),
        ] {
            ok(&t.get(&path).await, &path);
        }
        let wiql = json!({"query": "SELECT [System.Id] FROM WorkItems ORDER BY [System.Id]"});
        ok(
            &t.post(
                &format!("Fabrikam/Fabrikam%20Team/_apis/wit/wiql?$top=5&api-version={v}"),
                wiql,
            )
            .await,
            "wiql",
        );
        let batch = json!({"ids": [id], "fields": ["System.Title"], "errorPolicy": "omit"});
        ok(
            &t.post(&format!("Fabrikam/_apis/wit/workitemsbatch?api-version={v}"), batch)
                .await,
            "batch",
        );
        let feed = json!({"fields": ["System.Title"], "includeDeleted": true});
        ok(
            &t.post(
                &format!("Fabrikam/_apis/wit/reporting/workitemrevisions?api-version={v}"),
                feed,
            )
            .await,
            "feed",
        );
        let bytes = vec![7u8; 10];
        let a = t
            .raw(
                "POST",
                &format!("Fabrikam/_apis/wit/attachments?fileName=a.bin&api-version={v}"),
                Some("application/octet-stream"),
                bytes.clone(),
                &[],
            )
            .await;
        ok(&a, "attachment");
        let aid = a.json()["id"].as_str().unwrap_or_default().to_string();
        ok(
            &t.get(&format!(
                "_apis/wit/attachments/{aid}?fileName=a.bin&download=true&api-version={v}"
            ))
            .await,
            "attachment get",
        );
        let chunked = t
            .raw(
                "POST",
                &format!("Fabrikam/_apis/wit/attachments?fileName=b.bin&uploadType=Chunked&api-version={v}"),
                Some("application/octet-stream"),
                Vec::new(),
                &[],
            )
            .await;
        ok(&chunked, "chunked");
        let cid = chunked.json()["id"].as_str().unwrap_or_default().to_string();
        let chunk = t
            .raw(
                "PUT",
                &format!("Fabrikam/_apis/wit/attachments/{cid}?fileName=b.bin&api-version={v}"),
                Some("application/octet-stream"),
                bytes,
                &[("content-range", "bytes 0-9/10")],
            )
            .await;
        ok(&chunk, "chunk");
        let edit = json!([{"op": "test", "path": "/rev", "value": 2}, add("/fields/System.Tags", json!("b; a"))]);
        ok(
            &t.patch_doc(
                "PATCH",
                &format!("_apis/wit/workitems/{id}?bypassRules=false&api-version={v}"),
                edit,
            )
            .await,
            "update",
        );
        if profile.has_comments_api() {
            let fmt = if profile.has_comment_format() {
                "format=html&"
            } else {
                ""
            };
            let added = t
                .post(
                    &format!("Fabrikam/_apis/wit/workItems/{id}/comments?{fmt}api-version={c}"),
                    json!({"text": "<p>x</p>"}),
                )
                .await;
            ok(&added, "comment add");
            let n = added.json()["id"].as_u64().unwrap_or_default();
            let path = format!("Fabrikam/_apis/wit/workItems/{id}/comments/{n}");
            ok(
                &t.get(&format!("{path}?$expand=renderedText&api-version={c}")).await,
                "comment get",
            );
            ok(
                &t.raw(
                    "PATCH",
                    &format!("{path}?{fmt}api-version={c}"),
                    Some("application/json"),
                    json!({"text": "y"}).to_string().into_bytes(),
                    &[],
                )
                .await,
                "comment update",
            );
            ok(
                &t.raw("DELETE", &format!("{path}?api-version={c}"), None, Vec::new(), &[])
                    .await,
                "comment delete",
            );
        } else {
            let rev = t
                .get(&format!("Fabrikam/_apis/wit/workItems/{id}/comments?api-version={c}"))
                .await
                .json()["comments"][0]["revision"]
                .as_u64()
                .unwrap_or_default();
            ok(
                &t.get(&format!(
                    "Fabrikam/_apis/wit/workItems/{id}/comments/{rev}?api-version={c}"
                ))
                .await,
                "history comment get",
            );
        }
        ok(
            &t.raw(
                "DELETE",
                &format!("_apis/wit/workitems/{id}?api-version={v}"),
                None,
                Vec::new(),
                &[],
            )
            .await,
            "delete",
        );
        let req = hyper::Request::get(format!("http://{}/_sim/conformance", t.sim.addr))
            .header("authorization", &t.auth)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let report = t
            .http
            .request(req)
            .await
            .expect("response")
            .into_body()
            .collect()
            .await
            .expect("body");
        let report: Value = serde_json::from_slice(&report.to_bytes()).unwrap_or(Value::Null);
        assert_eq!(report["enabled"], json!(true));
        assert_eq!(report["violations"], json!(t.sim.conformance_violations()));
        t.sim.assert_conformant();
        t.sim.shutdown().await;
    }
}
