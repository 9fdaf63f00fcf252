//! The text of every message, as a plain-text part and an HTML part. Links always use the
//! server's public URL; every value from outside is escaped in the HTML part.

/// A message ready for the outbox.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub kind: &'static str,
    pub subject: String,
    pub text: String,
    pub html: String,
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Subjects are one line: newlines from outside would otherwise start new headers.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn html_page(paragraphs: &[String], link: Option<(&str, &str)>) -> String {
    let mut body = String::from("<!doctype html><html><body style=\"font-family:sans-serif\">");
    for p in paragraphs {
        body.push_str("<p>");
        body.push_str(&escape(p));
        body.push_str("</p>");
    }
    if let Some((label, url)) = link {
        body.push_str(&format!(
            "<p><a href=\"{}\">{}</a></p>",
            escape(url),
            escape(label)
        ));
    }
    body.push_str("</body></html>");
    body
}

pub fn confirm_email(model: &str, name: &str, confirm_url: &str, status_url: &str) -> Rendered {
    let paras = vec![
        format!("Hello {name},"),
        format!(
            "you applied for access to the model {model}. Please confirm your email address so that your application can be reviewed."
        ),
        format!("Your application's status page, which you can bookmark: {status_url}"),
        "If you did not apply, ignore this message.".to_string(),
    ];
    Rendered {
        kind: "confirm_email",
        subject: one_line(&format!("Confirm your email to apply for {model}")),
        text: format!(
            "{}\n\nConfirm: {confirm_url}\n\n{}\n{}\n",
            paras[..2].join("\n\n"),
            paras[2],
            paras[3]
        ),
        html: html_page(&paras, Some(("Confirm my email address", confirm_url))),
    }
}

pub fn application_received(model: &str, status_url: &str) -> Rendered {
    let paras = vec![
        format!(
            "Your email is confirmed and your application for {model} is now waiting for review."
        ),
        "You will get an email when it has been decided.".to_string(),
    ];
    Rendered {
        kind: "application_received",
        subject: one_line(&format!("Your application for {model} is awaiting review")),
        text: format!("{}\n\nStatus: {status_url}\n", paras.join("\n\n")),
        html: html_page(&paras, Some(("Application status", status_url))),
    }
}

pub fn new_application(
    model: &str,
    applicant: &str,
    affiliation: &str,
    admin_url: &str,
) -> Rendered {
    let paras = vec![format!(
        "{applicant} ({affiliation}) applied for access to {model} and confirmed their email."
    )];
    Rendered {
        kind: "new_application",
        subject: one_line(&format!("New application for {model}")),
        text: format!("{}\n\nReview: {admin_url}\n", paras[0]),
        html: html_page(&paras, Some(("Review applications", admin_url))),
    }
}

pub fn approved(
    model: &str,
    status_url: &str,
    public_url: &str,
    expires: Option<&str>,
) -> Rendered {
    let mut paras = vec![format!("Your application for {model} has been approved.")];
    if let Some(e) = expires {
        paras.push(format!("Your access lasts until {e}."));
    }
    paras.push(format!("Issue a download token on your status page, then download with, for example: curl -H \"Authorization: Bearer $TOKEN\" -O {public_url}/{model}/resolve/main/<file>  or  HF_ENDPOINT={public_url} HF_TOKEN=$TOKEN hf download {model}"));
    Rendered {
        kind: "approved",
        subject: one_line(&format!("Access to {model} approved")),
        text: format!(
            "{}\n\nStatus and tokens: {status_url}\n",
            paras.join("\n\n")
        ),
        html: html_page(&paras, Some(("Status and tokens", status_url))),
    }
}

pub fn rejected(model: &str, reason: &str, may_reapply: bool, status_url: &str) -> Rendered {
    let paras = vec![
        format!("Your application for {model} has been rejected."),
        format!("Reason: {reason}"),
        if may_reapply {
            "You may apply again.".to_string()
        } else {
            "This model does not accept a new application from you.".to_string()
        },
    ];
    Rendered {
        kind: "rejected",
        subject: one_line(&format!("Your application for {model}")),
        text: format!("{}\n\nStatus: {status_url}\n", paras.join("\n\n")),
        html: html_page(&paras, Some(("Application status", status_url))),
    }
}

pub fn integrity_failure(model: &str, path: &str, sha256: &str, problem: &str) -> Rendered {
    let paras = vec![
        format!(
            "A stored file failed verification and has been quarantined: {model} {path} (sha256 {sha256})."
        ),
        format!("Problem: {problem}"),
        "Downloads of it answer 503 until it is re-imported with `weightgate models add`."
            .to_string(),
    ];
    Rendered {
        kind: "integrity_failure",
        subject: one_line(&format!("Integrity failure: {model} {path}")),
        text: paras.join("\n\n") + "\n",
        html: html_page(&paras, None),
    }
}

pub fn grant_expiring(model: &str, expires: &str, status_url: &str) -> Rendered {
    let paras = vec![
        format!("Your access to {model} ends on {expires}."),
        "Download what you still need before then; to keep access, apply again or ask the model's administrators to extend it.".to_string(),
    ];
    Rendered {
        kind: "grant_expiring",
        subject: one_line(&format!("Your access to {model} ends in less than 7 days")),
        text: format!("{}\n\nStatus: {status_url}\n", paras.join("\n\n")),
        html: html_page(&paras, Some(("Application status", status_url))),
    }
}

pub fn grant_expired(model: &str, status_url: &str) -> Rendered {
    let paras = vec![
        format!("Your access to {model} has ended; your tokens for it no longer work."),
        "You may apply again from the model's page.".to_string(),
    ];
    Rendered {
        kind: "grant_expired",
        subject: one_line(&format!("Your access to {model} has ended")),
        text: format!("{}\n\nStatus: {status_url}\n", paras.join("\n\n")),
        html: html_page(&paras, Some(("Application status", status_url))),
    }
}

pub fn grant_revoked(model: &str, reason: &str, status_url: &str) -> Rendered {
    let paras = vec![
        format!("Your access to {model} has been revoked; your tokens for it no longer work."),
        format!("Reason: {reason}"),
    ];
    Rendered {
        kind: "grant_revoked",
        subject: one_line(&format!("Your access to {model} was revoked")),
        text: format!("{}\n\nStatus: {status_url}\n", paras.join("\n\n")),
        html: html_page(&paras, Some(("Application status", status_url))),
    }
}

pub fn token_revoked(model: &str, label: &str, status_url: &str) -> Rendered {
    let which = if label.is_empty() {
        "One of your download tokens".to_string()
    } else {
        format!("Your download token \"{label}\"")
    };
    let paras = vec![
        format!("{which} for {model} was revoked by an administrator."),
        "Your access itself is unchanged: issue a new token from your status page.".to_string(),
    ];
    Rendered {
        kind: "token_revoked",
        subject: one_line(&format!("A download token for {model} was revoked")),
        text: format!(
            "{}\n\nStatus and tokens: {status_url}\n",
            paras.join("\n\n")
        ),
        html: html_page(&paras, Some(("Status and tokens", status_url))),
    }
}

/// One message listing a day's new applications for models that asked for a digest.
pub fn digest(items: &[(String, String, String)], admin_url: &str) -> Rendered {
    let mut paras = vec![format!(
        "{} new application(s) are waiting for review:",
        items.len()
    )];
    paras.extend(
        items
            .iter()
            .map(|(model, name, affiliation)| format!("{model}: {name} ({affiliation})")),
    );
    Rendered {
        kind: "digest",
        subject: one_line(&format!("{} new application(s) to review", items.len())),
        text: format!("{}\n\nReview: {admin_url}\n", paras.join("\n")),
        html: html_page(&paras, Some(("Review applications", admin_url))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_escaped_and_subjects_stay_one_line() {
        let r = rejected(
            "o/m\r\nBcc: x@y",
            "<script>alert(1)</script>",
            true,
            "http://h/s?a=1&b=2",
        );
        assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
        assert!(r.html.contains("&lt;script&gt;"));
        assert!(!r.html.contains("<script>"));
        assert!(r.html.contains("a=1&amp;b=2"));
    }
}
