//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`):
//! a `chromedriver` on a free port, killed on drop, and a session on it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use super::servers::free_port;
use super::wait::eventually;

/// A chromedriver process and a headless Chromium session.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width`×`height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) is installed");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually("a chromedriver session", || {
            let (caps, url) = (caps.clone(), url.clone());
            async move {
                ClientBuilder::rustls()
                    .ok()?
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .ok()
            }
        })
        .await;
        Browser { client, driver }
    }

    /// Ends the session (the browser closes).
    pub async fn close(&self) {
        let _ = self.client.clone().close().await;
    }

    /// Types `text` into the element with id `id`.
    pub async fn type_into(&self, id: &str, text: &str) {
        let input = self.client.find(Locator::Id(id)).await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.click().await.unwrap();
    }

    /// Waits until the status page says it follows the event stream.
    pub async fn until_live(&self) {
        self.until(
            "the live stream",
            r#"return document.getElementById("link").textContent === "live";"#,
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// Waits until `script` returns something truthy; returns it.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        eventually(what, || async {
            let v = self.js(script, vec![]).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            truthy.then_some(v)
        })
        .await
    }

    /// Like [`Browser::until`], giving up after `within` (a bound the product promises).
    pub async fn within(&self, within: Duration, script: &str) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.js(script, vec![]).await == json!(true) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
