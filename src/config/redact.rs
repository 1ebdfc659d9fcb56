//! Secrets out of what pgferry prints: connection strings and URLs with
//! their password replaced by `***`, by parsing them (a URL's userinfo and a
//! `password` query parameter, or a key=value string with quoting), never by
//! matching a pattern. Every sink's URL goes through [`redact_userinfo`] too.

/// Replaces the password of a Postgres connection string with `***`, by
/// parsing it: the `user:password@` of a URL and a `password` query
/// parameter, or the `password` key of a key=value string (quoted values,
/// spaces, `=` and `&` included). A string that does not parse is redacted
/// from its `password` on.
pub fn redact_url(url: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            return format!("{scheme}{}", redact_uri_rest(rest));
        }
    }
    redact_conninfo(url)
}

/// A service URL (`redis://`, `https://`, `nats://`…) with the password of
/// its `user:password@` replaced by `***`. With `lone_secret`, userinfo
/// without a `:` is a secret too and is replaced whole (`redis://password@host`,
/// `nats://token@host`); without it, a user name alone is kept. The last `@`
/// ends the userinfo, so a password holding `@`, `/` or `?` is covered.
pub fn redact_service_url(url: &str, lone_secret: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: hide whatever could be userinfo.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        };
    };
    match rest.rfind('@') {
        Some(at) if lone_secret && at > 0 && !rest[..at].contains(':') => {
            format!("{scheme}://***{}", &rest[at..])
        }
        _ => format!("{scheme}://{}", redact_userinfo(rest)),
    }
}

/// Redacts the password of an URL's `user:password@` (everything between
/// `scheme://` and the last `@`), keeping the user: `rest` is the URL after
/// `scheme://`. Used for Postgres, Redis and search URLs alike.
pub fn redact_userinfo(rest: &str) -> String {
    // The last '@' ends the user info: a password may hold '@', '/', '?'.
    let Some(at) = rest.rfind('@') else {
        return rest.to_string();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***{host}"),
        // A user alone is no secret; `redis://password@host` is handled by
        // its caller.
        None => format!("{userinfo}{host}"),
    }
}

pub(super) fn redact_uri_rest(rest: &str) -> String {
    let redacted = redact_userinfo(rest);
    // A password can also be a query parameter (percent-encoded key).
    let Some(q) = redacted.find('?') else {
        return redacted;
    };
    let (head, query) = redacted.split_at(q + 1);
    let mut out = head.to_string();
    let mut secret = false;
    for (i, kv) in query.split('&').enumerate() {
        let key = kv.split('=').next().unwrap_or("");
        let key = percent_decode(key);
        if i > 0 {
            out.push('&');
        }
        if key == "password" || key == "sslpassword" {
            out.push_str(&kv[..kv.find('=').map_or(kv.len(), |e| e + 1)]);
            out.push_str("***");
            secret = true;
        } else if secret && !kv.contains('=') {
            // A raw '&' inside the password: the rest of it.
            out.push_str("***");
        } else {
            secret = false;
            out.push_str(kv);
        }
    }
    out
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Redacts the `password` of a libpq key=value string: `key = value` pairs,
/// a value either bare (up to white space, `\` escapes) or single-quoted
/// (`\'` and `\\` escapes).
pub(super) fn redact_conninfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let ws = |c: u8| c.is_ascii_whitespace();
    while i < b.len() {
        // White space between pairs is kept as it is.
        let start = i;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        out.push_str(&s[start..i]);
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !ws(b[i]) {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Not key=value: redact from a password on, keep the rest.
            return redact_tail(s, &out, key_start);
        }
        i += 1;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return redact_tail(s, &out, key_start),
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < b.len() && !ws(b[i]) {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
        }
        let i_end = i.min(b.len());
        out.push_str(&s[key_start..value_start]);
        if key == "password" || key == "sslpassword" {
            out.push_str("***");
        } else {
            out.push_str(&s[value_start..i_end]);
        }
        i = i_end;
    }
    out
}

/// `s` could not be parsed from `from` on: keep what was parsed, and the
/// rest only when it holds no password.
pub(super) fn redact_tail(s: &str, parsed: &str, from: usize) -> String {
    let rest = &s[from..];
    match rest.find("password") {
        Some(p) => format!("{parsed}{}password=***", &rest[..p]),
        None => format!("{parsed}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_lose_their_secrets_and_keep_the_rest() {
        let r = |u: &str, lone: bool| redact_service_url(u, lone);
        assert_eq!(
            r("https://elastic:pw@es:9200/x", false),
            "https://elastic:***@es:9200/x"
        );
        assert_eq!(
            r("https://elastic@es:9200", false),
            "https://elastic@es:9200"
        );
        assert_eq!(
            r("nats://s3cr3t-token@bus:4222", true),
            "nats://***@bus:4222"
        );
        assert_eq!(r("nats://u:p/a@ss@bus", true), "nats://u:***@bus");
        assert_eq!(r("tls://bus:4222", true), "tls://bus:4222");
        assert_eq!(r("user:pw@host", false), "***@host");
    }
}
