//! The status page in a real browser (headless Chromium over WebDriver) against a real
//! fleet: it loads with no failed request and no script error, its counts equal the API's,
//! a device going offline shows within 3 s without a reload, the prefix search finds
//! devices, a group outage shows, and with a token it asks for it and then works.
//! `PRESENCED_SCREENSHOTS=<dir>` keeps screenshots (light and dark) there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::browser::Browser;
use support::outage::{ids, in_payload};
use support::*;

/// Failed requests (status ≥ 400) and script errors the page saw.
const FAILURES: &str = r#"
    const bad = performance.getEntriesByType("resource")
        .filter((e) => e.responseStatus >= 400).map((e) => e.name + " " + e.responseStatus);
    return bad.concat(window.presenced ? window.presenced.errors : ["no page script"]);
"#;

fn count_is(id: &str, n: u64) -> String {
    format!(r#"return document.getElementById("{id}").textContent.replace(/\D/g, "") === "{n}";"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_fleet_live() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "3s")]).await;
    let addr = app.http();
    let devices = Arc::new(devices);
    let site = ids("site", 40);
    let (quiet, beating) = site.split_at(30);
    let quiet_beats = keep_publishing(
        devices.clone(),
        in_payload(quiet, "site-a"),
        Duration::from_millis(700),
    );
    let _beats = keep_publishing(
        devices.clone(),
        in_payload(beating, "site-a"),
        Duration::from_millis(700),
    );
    for id in ids("lone", 5) {
        devices.heartbeat(&id, b"").await;
    }
    statuses
        .wait_for("40 online, 5 offline", |s| {
            s.iter().filter(|m| m.json["state"] == "offline").count() == 5
                && s.iter().filter(|m| m.json["state"] == "online").count() == 45
        })
        .await;

    let browser = Browser::start(1280, 1000).await;
    browser
        .client
        .goto(&format!("http://{addr}/"))
        .await
        .unwrap();
    let records = all_records(addr).await;
    let online = records.values().filter(|r| r["state"] == "online").count() as u64;
    let offline = records.values().filter(|r| r["state"] == "offline").count() as u64;
    assert_eq!((online, offline), (40, 5));
    browser
        .until("the online count", &count_is("n-online", online))
        .await;
    browser
        .until("the offline count", &count_is("n-offline", offline))
        .await;
    browser.until_live().await;
    let load = browser
        .js(
            r#"return performance.getEntriesByType("navigation")[0].duration;"#,
            vec![],
        )
        .await;
    eprintln!("page load (navigation duration): {load} ms");

    // A device going offline appears in the offline list without a reload.
    devices.heartbeat("late-1", b"").await;
    statuses
        .wait_for("late-1 offline", |s| {
            s.iter()
                .any(|m| m.json["device"] == "late-1" && m.json["state"] == "offline")
        })
        .await;
    let shown = browser
        .within(
            Duration::from_secs(3),
            r#"return !!document.querySelector('#offline [data-device="late-1"]');"#,
        )
        .await;
    assert!(
        shown,
        "late-1 is not in the offline list 3 s after its offline status"
    );

    // The search by id prefix.
    browser.type_into("prefix", "lone-").await;
    browser.click("#search button").await;
    let found = browser
        .until(
            "the search results",
            r#"const r = [...document.querySelectorAll('#results [data-device]')].map((b) => b.dataset.device);
               return r.length === 5 ? r : null;"#,
        )
        .await;
    assert_eq!(
        found,
        json!(["lone-000", "lone-001", "lone-002", "lone-003", "lone-004"])
    );

    // A group outage: 30 of site-a's 40 go silent.
    quiet_beats.cancel();
    browser
        .until(
            "site-a in outage on the page",
            r#"const row = document.querySelector('#groups tr[data-group="site-a"]');
               return !!row && row.classList.contains("outage");"#,
        )
        .await;
    let (_, group) = get_json(addr, "/groups/site-a").await;
    assert_eq!(group["state"], "outage", "{group}");

    if let Ok(dir) = std::env::var("PRESENCED_SCREENSHOTS") {
        for theme in ["light", "dark"] {
            browser
                .js(
                    "document.documentElement.dataset.theme = arguments[0]; window.scrollTo(0, 0);",
                    vec![json!(theme)],
                )
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await; // a frame with the new colours
            let png = browser.client.screenshot().await.unwrap();
            std::fs::write(format!("{dir}/status-page-{theme}.png"), png).unwrap();
        }
    }
    let failures = browser.js(FAILURES, vec![]).await;
    assert_eq!(failures, json!([]), "failed requests or script errors");
    browser.close().await;
    check_invariants(&mqtt, addr, &statuses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_then_works() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("http.auth_token", "s3cret-page"), ("presence.ttl", "60s")]).await;
    let addr = app.http();
    for id in ids("tok", 3) {
        devices.heartbeat(&id, b"").await;
    }
    statuses.wait_for("3 online", |s| s.len() >= 3).await;
    let browser = Browser::start(800, 900).await;
    browser
        .client
        .goto(&format!("http://{addr}/"))
        .await
        .unwrap();
    browser
        .until(
            "the token prompt",
            r#"return document.getElementById("token-dialog").open;"#,
        )
        .await;
    browser.type_into("token", "s3cret-page").await;
    browser.click("#token-form button").await;
    browser
        .until("the online count", &count_is("n-online", 3))
        .await;
    browser.until_live().await;
    // The token stays with the tab, not in the address bar or a cookie.
    let kept = browser
        .js(r#"return [sessionStorage.getItem("presenced-token"), document.cookie, location.search];"#, vec![])
        .await;
    assert_eq!(kept, json!(["s3cret-page", "", ""]));
    // Live with the token: a new device shows up without a reload.
    devices.heartbeat("tok-new", b"").await;
    browser
        .until("the new count", &count_is("n-online", 4))
        .await;
    browser.close().await;
}
