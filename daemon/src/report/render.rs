//! The report as Markdown and as one self-contained HTML file: inline
//! style (allowed by its hash in the Content-Security-Policy), inline SVG
//! charts, no script, and a policy that forbids loading anything, so it
//! opens the same on an air-gapped machine as anywhere.

use std::fmt::Write as _;

use super::{LicenceRow, Report, TenantRow};

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1b1f24;padding:0 1em}\
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;margin:.6em 0;width:100%}th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}\
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.85em;word-break:break-all}\
.ok{color:#116329;font-weight:600}.bad{color:#a40e26;font-weight:600}.warn{color:#7d4e00;font-weight:600}\
.box{border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;margin:.6em 0;background:#f6f8fa}\
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em;color:#57606a}\
.legend span{display:inline-block;margin-right:1em}.sw{display:inline-block;width:.8em;height:.8em;margin-right:.3em;vertical-align:middle}\
.s0{background:#0969da}.s1{background:#bf3989}.s2{background:#1a7f37}.s3{background:#9a6700}.s4{background:#8250df}.s5{background:#cf222e}\
footer{margin-top:3em;color:#57606a;font-size:.9em}";

const PALETTE: [&str; 6] = [
    "#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df", "#cf222e",
];

/// The month in one sentence (numbers only: no escaping needed).
fn summary(t: &super::Totals) -> String {
    format!(
        "{} decisions: {} allowed, {} refused. {} requests counted ({} cut off), {} allowed but not served. \
         {} prompt and {} generated tokens. {} distinct users.",
        t.decisions,
        t.allowed,
        t.denied,
        t.requests,
        t.cut_off,
        t.not_served,
        t.prompt_tokens,
        t.completion_tokens,
        t.distinct_users
    )
}

/// HTML-escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn percent(f: f64) -> String {
    format!("{:.1}%", f * 100.0)
}

fn style_hash() -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(STYLE.as_bytes()))
}

/// The Content-Security-Policy the HTML carries: nothing may be loaded,
/// nothing run; only its own inline style block applies.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; style-src 'sha256-{}'; img-src 'none'; font-src 'none'; script-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'",
        style_hash()
    )
}

pub fn html(r: &Report) -> String {
    let mut h = String::new();
    let title = format!("airgate compliance report {}", r.month);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&content_security_policy()),
        esc(&title)
    );
    let _ = write!(
        h,
        "<h1>{}</h1>\n<p>Period {} to {} (UTC). Generated {} by {}.</p>\n",
        esc(&title),
        esc(&r.period.from),
        esc(&r.period.until),
        esc(&r.generated_at),
        esc(&r.generator)
    );

    // The verdict first: is the record whole?
    h.push_str("<div class=\"box\">\n");
    if r.chain_verified {
        h.push_str("<p><span class=\"ok\">Audit chain verified</span> on every host: every record's hash, every link, every signed checkpoint.</p>\n");
    } else {
        h.push_str("<p><span class=\"bad\">Audit chain NOT verified</span>: the figures below come from records that cannot all be trusted.</p>\n");
    }
    for n in &r.notes {
        let _ = writeln!(h, "<p class=\"warn\">{}</p>", esc(n));
    }
    let t = &r.totals;
    let _ = write!(h, "<p>{}</p>\n</div>\n", summary(t));

    h.push_str("<h2>Licences: distinct users against thresholds</h2>\n<div class=\"charts\">\n");
    for l in r
        .licences
        .iter()
        .filter(|l| l.distinct_users > 0 || l.threshold.is_some())
    {
        h.push_str(&users_chart(l));
    }
    h.push_str("</div>\n<table>\n<tr><th>Licence</th><th>Threshold</th><th>Distinct users</th><th>Of threshold</th><th>Review by</th><th>Attribution and obligations</th><th>Models</th></tr>\n");
    for l in &r.licences {
        let fraction = l.fraction.map_or_else(|| "—".to_owned(), percent);
        let class = if l.over_threshold {
            "bad"
        } else if l.fraction.is_some_and(|f| f >= 0.8) {
            "warn"
        } else {
            ""
        };
        let review = match (&l.review_by, &l.review_passed) {
            (Some(d), Some(p)) => format!(
                "{} <span class=\"bad\">{}</span> (then: {})",
                esc(d),
                esc(p),
                esc(l.after_review.as_deref().unwrap_or("?"))
            ),
            (Some(d), None) => esc(d),
            _ => "—".to_owned(),
        };
        let mut obligations = Vec::new();
        if let Some(a) = &l.attribution {
            obligations.push(format!("Attribution: {}", esc(a)));
        }
        if let Some(p) = &l.derivative_prefix {
            obligations.push(format!("Derivatives named <code>{}</code>…", esc(p)));
        }
        if !l.prohibited_uses.is_empty() {
            obligations.push(format!(
                "Prohibited uses: {}",
                esc(&l.prohibited_uses.join(", "))
            ));
        }
        if l.commercial_use == Some(false) {
            obligations.push("No commercial use".to_owned());
        }
        let _ = writeln!(
            h,
            "<tr><td>{}<br><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n {class}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.name),
            esc(&l.id),
            l.threshold
                .map_or_else(|| "none".to_owned(), |t| t.to_string()),
            l.distinct_users,
            fraction,
            review,
            obligations.join("<br>"),
            esc(&l.models.join(", "))
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Models</h2>\n");
    for m in &r.models {
        if m.format.is_none() && m.files.is_empty() {
            let _ = write!(
                h,
                "<h3>{}</h3>\n<p>Names callers asked for that no manifest in force has: {} refused.</p>\n",
                esc(&m.id),
                m.denied
            );
            continue;
        }
        let _ = write!(
            h,
            "<h3>{}</h3>\n<p>Format {}; licence <code>{}</code>{}{}.</p>\n<table>\n<tr><th>File</th><th>Role</th><th>SHA-256</th></tr>\n",
            esc(&m.id),
            esc(m.format.as_deref().unwrap_or("?")),
            esc(m.licence.as_deref().unwrap_or("?")),
            if m.derived_from.is_empty() {
                String::new()
            } else {
                format!("; derived from {}", esc(&m.derived_from.join(" ← ")))
            },
            if m.licences.len() > 1 {
                format!("; used under {}", esc(&m.licences.join(", ")))
            } else {
                String::new()
            }
        );
        for f in &m.files {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(&f.name),
                esc(&f.role),
                esc(&f.sha256)
            );
        }
        let _ = write!(
            h,
            "</table>\n<p>{} requests, {} not served, {} refused; {} prompt and {} generated tokens; {} distinct users.</p>\n",
            m.requests,
            m.not_served,
            m.denied,
            m.prompt_tokens,
            m.completion_tokens,
            m.distinct_users
        );
        if !m.tenants.is_empty() {
            h.push_str("<table>\n<tr><th>Tenant</th><th>Requests</th><th>Distinct users</th><th>Prompt tokens</th><th>Generated tokens</th></tr>\n");
            for t in &m.tenants {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    esc(&t.tenant),
                    t.requests,
                    t.distinct_users,
                    t.prompt_tokens,
                    t.completion_tokens
                );
            }
            h.push_str("</table>\n");
        }
        if !m.denials.is_empty() {
            let list: Vec<String> = m
                .denials
                .iter()
                .map(|(r, n)| format!("<code>{}</code> {n}", esc(r)))
                .collect();
            let _ = writeln!(h, "<p>Refused: {}.</p>", list.join(", "));
        }
    }

    h.push_str("<h2>Tenants</h2>\n");
    h.push_str(&requests_chart(&r.tenants));
    h.push_str("<table>\n<tr><th>Tenant</th><th>Requests</th><th>Not served</th><th>Refused</th><th>Distinct users</th><th>User cap</th><th>Tokens</th><th>Refusals by reason</th></tr>\n");
    for t in &r.tenants {
        let cap = t.cap.as_ref().map_or_else(
            || "none".to_owned(),
            |c| {
                format!(
                    "{} a month ({} scope; {} per host; at most {} users on one host): {}",
                    c.max_users_per_month,
                    esc(&c.scope),
                    c.host_cap,
                    c.most_users_on_a_host,
                    percent(c.fraction)
                )
            },
        );
        let reasons: Vec<String> = t
            .denials
            .iter()
            .map(|(r, n)| format!("<code>{}</code> {n}", esc(r)))
            .collect();
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{cap}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&t.id),
            t.requests,
            t.not_served,
            t.denied,
            t.distinct_users,
            t.prompt_tokens + t.completion_tokens,
            reasons.join(", ")
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h2>Refusals by reason</h2>\n<table>\n<tr><th>Reason code</th><th>Requests</th></tr>\n",
    );
    for (reason, n) in &r.denials {
        let _ = writeln!(
            h,
            "<tr><td><code>{}</code></td><td class=\"n\">{n}</td></tr>",
            esc(reason)
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Policy bundles in force</h2>\n<table>\n<tr><th>Version</th><th>Digest</th><th>Issuer</th><th>Signature</th><th>In force</th><th>Decisions</th></tr>\n");
    for b in &r.bundles {
        let spans: Vec<String> = b
            .in_force
            .iter()
            .map(|i| format!("{} → {} ({})", esc(&i.from), esc(&i.until), esc(&i.host)))
            .collect();
        let _ = writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            b.version,
            esc(&b.digest),
            esc(b.issuer.as_deref().unwrap_or("?")),
            esc(&b.signature),
            spans.join("<br>"),
            b.decisions
        );
    }
    h.push_str("</table>\n");

    if !r.warnings.is_empty() {
        h.push_str("<h2>Usage warnings</h2>\n<table>\n<tr><th>Time</th><th>Scope</th><th>Limit</th><th>Users</th><th>Reached</th></tr>\n");
        for w in &r.warnings {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{} <code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(w["time"].as_str().unwrap_or("")),
                esc(w["scope"].as_str().unwrap_or("")),
                esc(w["id"].as_str().unwrap_or("")),
                w["limit"],
                w["users"],
                percent(w["fraction"].as_f64().unwrap_or(0.0))
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Audit chain</h2>\n<table>\n<tr><th>Source</th><th>Host key (SHA-256)</th><th>Verification</th><th>Records</th><th>The month</th><th>Signed checkpoints</th></tr>\n");
    for c in &r.hosts {
        let verdict = match (&c.error, c.verified) {
            (None, true) => format!(
                "<span class=\"ok\">verified</span> from {}",
                esc(&c.starts_at)
            ),
            (e, _) => format!(
                "<span class=\"bad\">broken</span>: {}",
                esc(e.as_deref().unwrap_or("?"))
            ),
        };
        let range = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "none".to_owned(),
        };
        let cp = |c: &Option<super::CheckpointRef>| {
            c.as_ref().map_or_else(
                || "none".to_owned(),
                |c| {
                    format!(
                        "record {} (through {}, {})",
                        c.seq,
                        c.vouches_through,
                        esc(&c.time)
                    )
                },
            )
        };
        let covered = if c.month_covered {
            "<span class=\"ok\">wholly between signed checkpoints</span>".to_owned()
        } else {
            format!(
                "<span class=\"warn\">not wholly covered</span> ({} records after the last checkpoint)",
                c.unvouched_records
            )
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{verdict}</td><td>{} ({})</td><td>{} records ({}); {covered}</td><td>{} verified; before the month: {}; after it: {}</td></tr>",
            esc(&c.source),
            esc(&c.host_key_sha256),
            c.records,
            range(c.first_seq, c.last_seq),
            c.month_records,
            range(c.month_first_seq, c.month_last_seq),
            c.signed_checkpoints,
            cp(&c.checkpoint_before),
            cp(&c.checkpoint_after)
        );
    }
    h.push_str("</table>\n");
    h.push_str("<footer>End users appear only as keyed hashes. Re-check this report's source without the daemon: <code>airgate evidence verify PACK</code>.</footer>\n</body>\n</html>\n");
    h
}

/// A chart's drawing area: its size, margins and value scale (zero at the
/// bottom, a tenth above the largest value at the top).
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    max: f64,
}

impl Frame {
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 24.0;
    const RIGHT_MARGIN: f64 = 8.0;

    fn new(w: f64, h: f64, left: f64, largest: u64) -> Self {
        Self {
            w,
            h,
            left,
            max: largest.max(1) as f64 * 1.1,
        }
    }

    fn right(&self) -> f64 {
        self.w - Self::RIGHT_MARGIN
    }

    /// The y of the value axis' zero.
    fn base(&self) -> f64 {
        self.h - Self::BOTTOM
    }

    fn y(&self, v: f64) -> f64 {
        Self::TOP + (self.base() - Self::TOP) * (1.0 - v / self.max)
    }

    /// Height in pixels of a value.
    fn height(&self, v: f64) -> f64 {
        (self.base() - Self::TOP) * v / self.max
    }

    /// Opens the figure and draws both axes with the value axis' bounds.
    fn open(&self, label: &str) -> String {
        let (w, h, left, base, right) = (self.w, self.h, self.left, self.base(), self.right());
        let mut s = format!(
            "<figure><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">\n",
            esc(label)
        );
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{base}\" x2=\"{right}\" y2=\"{base}\" stroke=\"#8c959f\"/><line x1=\"{left}\" y1=\"{}\" x2=\"{left}\" y2=\"{base}\" stroke=\"#8c959f\"/>",
            Self::TOP
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{base}\" font-size=\"10\" text-anchor=\"end\">0</text>",
            left - 4.0,
            Self::TOP + 4.0,
            self.max.floor(),
            left - 4.0
        );
        s
    }

    /// A label under the day axis.
    fn day_label(&self, x: f64, anchor: &str, text: &str) -> String {
        format!(
            "<text x=\"{x:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"{anchor}\">{text}</text>\n",
            self.h - 8.0
        )
    }
}

/// Distinct users of a licence, day by day, against its threshold.
fn users_chart(l: &LicenceRow) -> String {
    let days = l.daily_users.len().max(1);
    let peak = l.daily_users.last().copied().unwrap_or(0);
    let f = Frame::new(340.0, 200.0, 40.0, peak.max(l.threshold.unwrap_or(0)));
    let x = |d: usize| f.left + (f.right() - f.left) * d as f64 / (days.max(2) - 1) as f64;
    let mut s = f.open(&format!("distinct users of {} by day", l.id));
    s.push_str(&f.day_label(f.left, "start", "day 1"));
    s.push_str(&f.day_label(f.right(), "end", &format!("day {days}")));
    if let Some(t) = l.threshold {
        let ty = f.y(t as f64);
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ty:.1}\" x2=\"{}\" y2=\"{ty:.1}\" stroke=\"#cf222e\" stroke-dasharray=\"5 3\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"10\" fill=\"#cf222e\" text-anchor=\"end\">threshold {t}</text>",
            f.left,
            f.right(),
            f.right() - 2.0,
            ty - 3.0
        );
    }
    let points: Vec<String> = l
        .daily_users
        .iter()
        .enumerate()
        .map(|(d, v)| format!("{:.1},{:.1}", x(d), f.y(*v as f64)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#0969da\" stroke-width=\"2\"/>",
        points.join(" ")
    );
    let _ = writeln!(
        s,
        "</svg><figcaption>{}: {} distinct users{}</figcaption></figure>",
        esc(&l.name),
        peak,
        l.threshold
            .map_or_else(String::new, |t| format!(" of a threshold of {t}"))
    );
    s
}

/// Requests per tenant per day, as stacked bars.
fn requests_chart(tenants: &[TenantRow]) -> String {
    let shown: Vec<&TenantRow> = tenants.iter().filter(|t| t.requests > 0).collect();
    if shown.is_empty() {
        return "<p>No requests were counted this month.</p>\n".to_owned();
    }
    let days = shown[0].daily_requests.len().max(1);
    let totals: Vec<u64> = (0..days)
        .map(|d| {
            shown
                .iter()
                .map(|t| t.daily_requests.get(d).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let f = Frame::new(
        720.0,
        220.0,
        44.0,
        totals.iter().copied().max().unwrap_or(0),
    );
    let slot = (f.right() - f.left) / days as f64;
    let bar = (slot * 0.8).max(1.0);
    let mut s = f.open("requests per tenant per day");
    for d in 0..days {
        let mut base = f.base();
        for (i, t) in shown.iter().enumerate() {
            let v = t.daily_requests.get(d).copied().unwrap_or(0);
            if v == 0 {
                continue;
            }
            let height = f.height(v as f64);
            base -= height;
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{base:.1}\" width=\"{bar:.1}\" height=\"{height:.1}\" fill=\"{}\"><title>{} day {}: {v}</title></rect>",
                f.left + slot * d as f64 + (slot - bar) / 2.0,
                PALETTE[i % PALETTE.len()],
                esc(&t.id),
                d + 1
            );
        }
        if d == 0 || (d + 1) % 5 == 0 {
            s.push_str(&f.day_label(
                f.left + slot * (d as f64 + 0.5),
                "middle",
                &(d + 1).to_string(),
            ));
        }
    }
    s.push_str("</svg><figcaption class=\"legend\">Requests per tenant per day: ");
    for (i, t) in shown.iter().enumerate() {
        let _ = write!(
            s,
            "<span><i class=\"sw s{}\"></i>{}</span>",
            i % PALETTE.len(),
            esc(&t.id)
        );
    }
    s.push_str("</figcaption></figure>\n");
    s
}

/// Markdown: the same sections as tables, for tickets and wikis.
pub fn markdown(r: &Report) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut m = String::new();
    let _ = write!(
        m,
        "# airgate compliance report {}\n\nPeriod {} to {} (UTC). Generated {} by {}.\n\n",
        r.month, r.period.from, r.period.until, r.generated_at, r.generator
    );
    let _ = writeln!(
        m,
        "**Audit chain: {}**\n",
        if r.chain_verified {
            "verified on every host"
        } else {
            "NOT VERIFIED"
        }
    );
    for n in &r.notes {
        let _ = writeln!(m, "- ⚠ {}", cell(n));
    }
    let t = &r.totals;
    let _ = write!(m, "\n{}\n\n", summary(t));
    m.push_str("## Licences\n\n| Licence | Threshold | Distinct users | Of threshold | Review by | Attribution | Models |\n|---|---:|---:|---:|---|---|---|\n");
    for l in &r.licences {
        let _ = writeln!(
            m,
            "| {} (`{}`) | {} | {} | {} | {}{} | {} | {} |",
            cell(&l.name),
            cell(&l.id),
            l.threshold
                .map_or_else(|| "none".to_owned(), |t| t.to_string()),
            l.distinct_users,
            l.fraction.map_or_else(|| "—".to_owned(), percent),
            l.review_by.as_deref().unwrap_or("—"),
            l.review_passed
                .as_ref()
                .map_or_else(String::new, |p| format!(" **{p}**")),
            cell(l.attribution.as_deref().unwrap_or("")),
            cell(&l.models.join(", "))
        );
    }
    m.push_str("\n## Models\n\n| Model | Licences | Requests | Not served | Refused | Prompt tokens | Generated tokens | Distinct users | Files (SHA-256) |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for x in &r.models {
        let files: Vec<String> = x
            .files
            .iter()
            .map(|f| format!("{} `{}`", cell(&f.name), f.sha256))
            .collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&x.id),
            cell(&x.licences.join(", ")),
            x.requests,
            x.not_served,
            x.denied,
            x.prompt_tokens,
            x.completion_tokens,
            x.distinct_users,
            files.join("<br>")
        );
    }
    m.push_str("\n## Tenants\n\n| Tenant | Requests | Not served | Refused | Distinct users | User cap | Refusals by reason |\n|---|---:|---:|---:|---:|---|---|\n");
    for x in &r.tenants {
        let reasons: Vec<String> = x
            .denials
            .iter()
            .map(|(r, n)| format!("`{r}` {n}"))
            .collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} |",
            cell(&x.id),
            x.requests,
            x.not_served,
            x.denied,
            x.distinct_users,
            x.cap.as_ref().map_or_else(
                || "none".to_owned(),
                |c| format!(
                    "{} ({}) {}",
                    c.max_users_per_month,
                    c.scope,
                    percent(c.fraction)
                )
            ),
            reasons.join(", ")
        );
    }
    m.push_str("\n## Refusals by reason\n\n| Reason | Requests |\n|---|---:|\n");
    for (reason, n) in &r.denials {
        let _ = writeln!(m, "| `{reason}` | {n} |");
    }
    m.push_str("\n## Policy bundles in force\n\n| Version | Digest | Signature | In force | Decisions |\n|---:|---|---|---|---:|\n");
    for b in &r.bundles {
        let spans: Vec<String> = b
            .in_force
            .iter()
            .map(|i| format!("{} → {} ({})", i.from, i.until, cell(&i.host)))
            .collect();
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {} | {} |",
            b.version,
            b.digest,
            cell(&b.signature),
            spans.join("<br>"),
            b.decisions
        );
    }
    m.push_str("\n## Audit chain\n\n| Source | Host key | Verified | Records | Month records | Checkpoint before | Checkpoint after | Covered |\n|---|---|---|---|---|---|---|---|\n");
    for c in &r.hosts {
        let cp = |c: &Option<super::CheckpointRef>| {
            c.as_ref()
                .map_or_else(|| "none".to_owned(), |c| format!("{} ({})", c.seq, c.time))
        };
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {} | {} | {} | {} | {} |",
            cell(&c.source),
            c.host_key_sha256,
            c.error.as_ref().map_or_else(
                || format!("yes, from {}", c.starts_at),
                |e| format!("**no**: {}", cell(e))
            ),
            c.records,
            c.month_records,
            cp(&c.checkpoint_before),
            cp(&c.checkpoint_after),
            if c.month_covered { "yes" } else { "no" }
        );
    }
    m
}

/// References an HTML document makes to anything outside itself: `src`,
/// `href`, `url(`, `@import`, and elements that load (link, script,
/// iframe, object, embed, img). Empty for a self-contained document.
pub fn external_references(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for needle in [
        " src=", " href=", "url(", "@import", "<link", "<script", "<iframe", "<object", "<embed",
        "<img", "<base", "xlink:", "srcset",
    ] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(needle) {
            let at = from + i;
            let end = (at + 60).min(html.len());
            let end = (end..=html.len())
                .find(|e| html.is_char_boundary(*e))
                .unwrap_or(html.len());
            found.push(html[at..end].to_owned());
            from = at + needle.len();
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_the_policy_pins_the_style() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'"));
        assert!(csp.contains(&style_hash()));
        assert!(external_references("<p>ok</p><style>p{}</style>").is_empty());
        assert_eq!(external_references("<img src=\"http://x\">").len(), 2);
        assert_eq!(
            external_references("<p style=\"background:url(x)\">").len(),
            1
        );
    }
}
