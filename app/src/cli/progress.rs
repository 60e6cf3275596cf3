//! Progress on stderr for the long commands: indicatif's bar on a terminal, and plain lines
//! anywhere else (a pipe, a log file, CI), where indicatif draws nothing at all — a training
//! run sent to a log said nothing for an hour and dropped its validation losses.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the plain form writes a progress line (its messages go out at once).
const LINE_EVERY: Duration = Duration::from_secs(30);

/// A progress report drawn from an indicatif template (`{bar:30} {pos}/{len} steps {msg} …`).
pub struct Progress(Kind);

enum Kind {
    Hidden,
    Bar(indicatif::ProgressBar),
    Lines(Mutex<Lines>),
}

/// The plain form's state: the template is rendered without the bar, one line at a time.
struct Lines {
    template: String,
    pos: u64,
    len: u64,
    msg: String,
    start: Instant,
    /// Where and when counting began (the first position set), for the rate.
    base: Option<(u64, Instant)>,
    /// When the last line was written, and at which position.
    written: Option<(Instant, u64)>,
}

impl Progress {
    /// Progress drawn with `template`; nothing at all when `hidden` (`--format json`).
    pub fn new(hidden: bool, template: &str) -> Self {
        if hidden {
            return Self(Kind::Hidden);
        }
        if !std::io::stderr().is_terminal() {
            return Self(Kind::Lines(Mutex::new(Lines::new(template))));
        }
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self(Kind::Bar(b))
    }

    pub fn set_length(&self, len: u64) {
        match &self.0 {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_length(len),
            Kind::Lines(l) => lock(l).len = len,
        }
    }

    /// Set the position; in the plain form this may write a line, so set the message first.
    pub fn set_position(&self, pos: u64) {
        match &self.0 {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_position(pos),
            Kind::Lines(l) => lock(l).moved_to(pos),
        }
    }

    pub fn inc(&self, delta: u64) {
        match &self.0 {
            Kind::Hidden => {}
            Kind::Bar(b) => b.inc(delta),
            Kind::Lines(l) => {
                let mut l = lock(l);
                let pos = l.pos + delta;
                l.moved_to(pos);
            }
        }
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        match &self.0 {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_message(msg.into()),
            Kind::Lines(l) => lock(l).msg = msg.into(),
        }
    }

    /// A line of its own above the bar (on a terminal) or in the log.
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.0 {
            Kind::Hidden => {}
            Kind::Bar(b) => b.println(line),
            Kind::Lines(_) => eprintln!("{}", line.as_ref()),
        }
    }

    pub fn finish_and_clear(&self) {
        if let Kind::Bar(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// The state, even when a thread panicked while holding it (it is only counters).
fn lock(l: &Mutex<Lines>) -> std::sync::MutexGuard<'_, Lines> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lines {
    /// Nothing counted yet; the clock starts now.
    fn new(template: &str) -> Self {
        Self {
            template: template.to_string(),
            pos: 0,
            len: 0,
            msg: String::new(),
            start: Instant::now(),
            base: None,
            written: None,
        }
    }

    /// Move to `pos`, writing a line at the first step and then when the last is `LINE_EVERY`
    /// old (the commands say how the work ended themselves).
    fn moved_to(&mut self, pos: u64) {
        self.pos = pos;
        let now = Instant::now();
        let base = *self.base.get_or_insert((pos, now));
        let due = match self.written {
            None => pos > base.0,
            Some((at, written_pos)) => pos != written_pos && now.duration_since(at) >= LINE_EVERY,
        };
        if due {
            eprintln!("{}", self.render(now));
            self.written = Some((now, pos));
        }
    }

    /// The template with its bar left out and its fields filled in.
    fn render(&self, now: Instant) -> String {
        let mut out = String::new();
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let field = &rest[open + 1..open + close];
            let name = field.split(':').next().unwrap_or_default();
            match name {
                "pos" => out.push_str(&self.pos.to_string()),
                "len" => out.push_str(&self.len.to_string()),
                "msg" => out.push_str(&self.msg),
                "elapsed" | "elapsed_precise" => out.push_str(&clock(now - self.start)),
                "eta" | "eta_precise" => out.push_str(&self.eta(now).map_or("?".into(), clock)),
                _ => {} // the bar, and anything a line cannot show
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Time left at the rate since counting began.
    fn eta(&self, now: Instant) -> Option<Duration> {
        let (pos0, t0) = self.base?;
        let done = self.pos.checked_sub(pos0).filter(|d| *d > 0)?;
        let left = self.len.checked_sub(self.pos)?;
        Some(now.duration_since(t0).mul_f64(left as f64 / done as f64))
    }
}

/// `h:mm:ss`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_template_without_the_bar() {
        let mut l =
            Lines::new("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]");
        let t0 = Instant::now();
        l.start = t0;
        l.len = 10;
        l.base = Some((0, t0));
        l.pos = 4;
        l.msg = "loss 0.5000".into();
        let s = l.render(t0 + Duration::from_secs(40));
        assert_eq!(s, "4/10 steps loss 0.5000 [0:00:40 < 0:01:00]");
    }

    #[test]
    fn writes_a_line_at_the_first_step_then_when_due() {
        let mut l = Lines::new("{pos}/{len}");
        l.len = 3;
        l.moved_to(0);
        assert!(l.written.is_none(), "nothing done yet");
        l.moved_to(1);
        assert_eq!(l.written.map(|w| w.1), Some(1));
        l.moved_to(2);
        assert_eq!(l.written.map(|w| w.1), Some(1), "not due for 30 s");
        let (at, _) = l.written.unwrap();
        l.written = Some((at - LINE_EVERY, 1));
        l.moved_to(3);
        assert_eq!(l.written.map(|w| w.1), Some(3), "due");
    }
}
