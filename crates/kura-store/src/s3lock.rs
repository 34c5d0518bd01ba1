//! The S3 requests OpenDAL has no call for: a bucket's versioning and Object Lock settings, and
//! an object's retention (read it, extend it). Signed with SigV4 by reqsign, OpenDAL's signer.

use crate::StoreError;
use base64::Engine;
use reqsign_aws_v4::{Credential, RequestSigner, StaticCredentialProvider};
use std::time::{Duration, SystemTime};

/// Object Lock retention modes. Under COMPLIANCE nobody, not even the account's root, shortens
/// a retention or deletes a locked version; under GOVERNANCE a user with a special permission
/// may, which kura never asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody deletes before the date.
    Compliance,
    /// Only a holder of `s3:BypassGovernanceRetention` deletes before the date.
    Governance,
}

impl LockMode {
    fn parse(s: &str) -> Option<LockMode> {
        match s.trim() {
            "COMPLIANCE" => Some(LockMode::Compliance),
            "GOVERNANCE" => Some(LockMode::Governance),
            _ => None,
        }
    }

    /// The name S3 uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }
}

/// A bucket's default retention: every new object version is locked this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRetention {
    /// The mode new versions get.
    pub mode: LockMode,
    /// How long.
    pub period: Duration,
}

/// What a bucket does besides storing objects, as it answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketFeatures {
    /// Versioning `Enabled` (deletes leave noncurrent versions) or `Suspended`; `None` when
    /// never enabled or the server does not say.
    pub versioning: Option<String>,
    /// Object Lock with a default retention.
    pub lock: Option<DefaultRetention>,
    /// Object Lock enabled without a default retention (kura locks nothing itself then).
    pub lock_without_default: bool,
}

/// An object's current retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The mode.
    pub mode: LockMode,
    /// Until when.
    pub until: SystemTime,
}

/// Signed requests to one bucket.
pub(crate) struct Raw {
    client: reqwest::Client,
    signer: reqsign_core::Signer<Credential>,
    /// `scheme://host[:port]` plus `/bucket` for path-style addressing.
    base: String,
    /// The repository's prefix in the bucket, without slashes at either end.
    prefix: String,
    /// Retries after a failed attempt.
    retries: usize,
}

/// The text of the first `<tag>...</tag>` in a small XML answer.
fn xml_field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim())
}

impl Raw {
    pub(crate) fn new(opts: &crate::S3Options, bucket: &str, prefix: &str) -> Result<Raw, String> {
        let region = &opts.region;
        let endpoint = if opts.endpoint.is_empty() { format!("https://s3.{region}.amazonaws.com") } else { opts.endpoint.trim_end_matches('/').to_string() };
        let base = if opts.virtual_host {
            let (scheme, host) = endpoint.split_once("://").ok_or_else(|| format!("endpoint {endpoint:?} has no scheme"))?;
            format!("{scheme}://{bucket}.{host}")
        } else {
            format!("{endpoint}/{bucket}")
        };
        let mut creds = StaticCredentialProvider::new(&opts.access_key_id, &opts.secret_access_key);
        if let Some(t) = &opts.session_token {
            creds = creds.with_session_token(t);
        }
        let signer = reqsign_core::Signer::new(reqsign_core::Context::new(), creds, RequestSigner::new("s3", region));
        let client = reqwest::Client::builder().timeout(opts.timeout).read_timeout(opts.io_timeout).build().map_err(|e| e.to_string())?;
        Ok(Raw { client, signer, base, prefix: prefix.trim_matches('/').to_string(), retries: opts.retries })
    }

    /// Sends one signed request, retrying network failures, 5xx and 429 answers with
    /// exponential backoff as OpenDAL's own requests are.
    async fn send(&self, method: http::Method, key: Option<&str>, query: &str, body: Vec<u8>) -> Result<(u16, http::HeaderMap, String), String> {
        let mut delay = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            let r = self.send_once(method.clone(), key, query, body.clone()).await;
            let transient = match &r {
                // 501 Not Implemented is an answer, not a hiccup.
                Ok((status, _, _)) => matches!(*status, 429 | 500 | 502 | 503 | 504),
                Err(_) => true,
            };
            if !transient || tries >= self.retries {
                return r;
            }
            tries += 1;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(8));
        }
    }

    /// One signed request; `query` is the subresource (`versioning`, `retention`).
    async fn send_once(&self, method: http::Method, key: Option<&str>, query: &str, body: Vec<u8>) -> Result<(u16, http::HeaderMap, String), String> {
        let url = match key {
            Some(k) if self.prefix.is_empty() => format!("{}/{k}?{query}", self.base),
            Some(k) => format!("{}/{}/{k}?{query}", self.base, self.prefix),
            None => format!("{}/?{query}", self.base),
        };
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
        let mut b = http::Request::builder().method(method).uri(&url).header("x-amz-content-sha256", sha);
        if !body.is_empty() {
            // PutObjectRetention requires a body checksum.
            let md5 = <md5::Md5 as md5::Digest>::digest(&body);
            b = b.header("content-md5", base64::engine::general_purpose::STANDARD.encode(md5));
        }
        let req = b.body(body).map_err(|e| e.to_string())?;
        let (mut parts, body) = req.into_parts();
        self.signer.sign(&mut parts, None).await.map_err(|e| format!("cannot sign the request: {e}"))?;
        let req = reqwest::Request::try_from(http::Request::from_parts(parts, body)).map_err(|e| e.to_string())?;
        let resp = self.client.execute(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        Ok((status, headers, text))
    }

    /// Versioning and Object Lock, as the bucket answers. Only an answer that says so (no lock
    /// configuration; a server that does not implement the call) counts as "none": a refusal
    /// or a failure is an error, since deletes would otherwise not respect the lock.
    pub(crate) async fn features(&self) -> Result<BucketFeatures, String> {
        let mut f = BucketFeatures::default();
        let absent = |status: u16, text: &str, what: &str| -> Result<(), String> {
            let code = xml_field(text, "Code").unwrap_or("");
            match (status, code) {
                (404 | 501, _) | (400, "NotImplemented" | "InvalidRequest") => Ok(()),
                (403, _) => Err(format!("reading the bucket's {what} settings was refused ({code}); kura needs s3:GetBucketVersioning and s3:GetBucketObjectLockConfiguration")),
                _ => Err(format!("reading the bucket's {what} settings answered {status} {code}")),
            }
        };
        let (status, _, text) = self.send(http::Method::GET, None, "versioning", Vec::new()).await?;
        if status == 200 {
            f.versioning = xml_field(&text, "Status").map(str::to_string);
        } else {
            absent(status, &text, "versioning")?;
        }
        let (status, _, text) = self.send(http::Method::GET, None, "object-lock", Vec::new()).await?;
        if status != 200 {
            absent(status, &text, "Object Lock")?;
        } else if xml_field(&text, "ObjectLockEnabled") == Some("Enabled") {
            let mode = xml_field(&text, "Mode").and_then(LockMode::parse);
            let days = xml_field(&text, "Days").and_then(|d| d.parse::<u64>().ok()).map(|d| d * 86_400);
            let years = xml_field(&text, "Years").and_then(|y| y.parse::<u64>().ok()).map(|y| y * 365 * 86_400);
            match (mode, days.or(years)) {
                (Some(mode), Some(secs)) => f.lock = Some(DefaultRetention { mode, period: Duration::from_secs(secs) }),
                _ => f.lock_without_default = true,
            }
        }
        Ok(f)
    }

    /// An object's retention from its HEAD, `None` when it has none.
    pub(crate) async fn retention(&self, key: &str, obj: &crate::ObjectName) -> Result<Option<Retention>, StoreError> {
        let (status, headers, _) = self.send(http::Method::HEAD, Some(key), "", Vec::new()).await.map_err(|e| net(obj, e))?;
        match status {
            200 => {}
            404 => return Err(StoreError::NotFound(obj.clone())),
            s => return Err(StoreError::Backend { verb: crate::Verb::Read, target: obj.to_string(), detail: format!("HEAD answered {s}") }),
        }
        let mode = headers.get("x-amz-object-lock-mode").and_then(|v| v.to_str().ok()).and_then(LockMode::parse);
        let until = headers
            .get("x-amz-object-lock-retain-until-date")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<jiff::Timestamp>().ok())
            .map(|t| SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanosecond().max(0) as u64));
        Ok(match (mode, until) {
            (Some(mode), Some(until)) => Some(Retention { mode, until }),
            _ => None,
        })
    }

    /// Sets an object's retention (only ever later than it is: S3 refuses to shorten one).
    pub(crate) async fn set_retention(&self, key: &str, obj: &crate::ObjectName, r: Retention) -> Result<(), StoreError> {
        let target = obj.to_string();
        // Rounded up to the second (the format has no finer unit): never shorter than asked,
        // so the next run does not find it short again.
        let until = jiff::Timestamp::try_from(r.until + Duration::from_millis(999))
            .map_err(|e| StoreError::Backend { verb: crate::Verb::Write, target: target.clone(), detail: e.to_string() })?;
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            r.mode.as_str(),
            until.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        );
        let (status, _, text) = self.send(http::Method::PUT, Some(key), "retention", body.into_bytes()).await.map_err(|e| net(obj, e))?;
        if status == 200 || status == 204 {
            return Ok(());
        }
        let code = xml_field(&text, "Code").unwrap_or("no error code").to_string();
        let detail = format!("extending the retention answered {status} {code}");
        Err(if status == 403 {
            StoreError::Denied { verb: crate::Verb::Write, target, reason: format!("{detail}; the credentials need s3:PutObjectRetention") }
        } else {
            StoreError::Backend { verb: crate::Verb::Write, target, detail }
        })
    }
}

fn net(obj: &crate::ObjectName, detail: String) -> StoreError {
    StoreError::Network { verb: crate::Verb::Read, target: obj.to_string(), detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_configuration_fields_are_read() {
        let x = "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Days>30</Days></DefaultRetention></Rule></ObjectLockConfiguration>";
        assert_eq!(xml_field(x, "ObjectLockEnabled"), Some("Enabled"));
        assert_eq!(xml_field(x, "Mode").and_then(LockMode::parse), Some(LockMode::Compliance));
        assert_eq!(xml_field(x, "Days"), Some("30"));
        assert_eq!(xml_field(x, "Years"), None);
        assert_eq!(xml_field("<a>", "a"), None);
    }
}
