//! `hasync health-server`: HTTP answers for a load balancer that say what
//! users get from this node, not only what its state record says.
//!
//! `/primary` is 200 only while (1) the node's record (read from its local
//! state_dir at each request, so a promote or a fence shows at once) says
//! primary, (2) no run holding the node's lock has its service stopped
//! (the step it announced, see `hasync::lock::activity`), and (3) the
//! application is up, and writable where its `writable_check` can tell.
//! `/standby` likewise, read-only. The application's probes run on this
//! machine, bounded by `--probe-timeout`, and their answer is reused for
//! `--probe-cache`; a probe that hangs counts as down after its deadline.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use hasync::config::Node;
use hasync::lock::{Activity, ServiceStep};
use hasync::service::{AppState, Mode};
use hasync::state::{NodeRole, StateRecord};
use hasync::transport::{Address, Transport};

use crate::cli::{Cli, HealthArgs};
use crate::exit::Exit;
use crate::output::Log;

pub fn run(cli: &Cli, args: &HealthArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let node = match &args.node {
        Some(name) => config
            .node(name)
            .ok_or_else(|| anyhow!("no node named {name:?} in {}", config.path.display()))?
            .clone(),
        None => {
            let local: Vec<&Node> = config
                .nodes
                .iter()
                .filter(|n| matches!(n.endpoint.address, Address::Local))
                .collect();
            match local.as_slice() {
                [one] => (*one).clone(),
                _ => bail!(
                    "which node is this? name it with --node NODE (or give it address = \"local\" in {})",
                    config.path.display()
                ),
            }
        }
    };
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| anyhow!("cannot listen on {}: {e}", args.listen))?;
    log.info(&format!(
        "hasync health-server: node {} on http://{}/primary, /standby, /health{}",
        node.name,
        listener.local_addr()?,
        if node.service.is_none() {
            " (no [service] for this node: its record alone decides)"
        } else {
            ""
        }
    ));
    let prober = Arc::new(Prober {
        transport: hasync::transport::on_this_machine(&node.name),
        node: node.clone(),
        cache: args.probe_cache,
        timeout: args.probe_timeout,
        state: Mutex::new(Probed::default()),
        done: Condvar::new(),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (node, prober) = (node.clone(), Arc::clone(&prober));
        std::thread::spawn(move || {
            let _ = answer(stream, &node, &prober);
        });
    }
    Ok(Exit::Ok)
}

/// The application's probes, run at most once per `cache` and one at a
/// time, whoever asks.
struct Prober {
    transport: Box<dyn Transport>,
    node: Node,
    cache: Duration,
    timeout: Duration,
    state: Mutex<Probed>,
    done: Condvar,
}

#[derive(Default)]
struct Probed {
    last: Option<(Instant, Option<AppState>)>,
    running: bool,
}

impl Prober {
    /// The application's state, at most `cache` old; down if the probe
    /// has not answered within `timeout`. `None`: no service configured.
    fn get(self: &Arc<Self>) -> Option<AppState> {
        self.node.service.as_ref()?;
        let asked = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((at, answer)) = &st.last {
                // Fresh, or answered since this request came.
                if at.elapsed() < self.cache || *at >= asked {
                    return answer.clone();
                }
            }
            if !st.running {
                st.running = true;
                let me = Arc::clone(self);
                std::thread::spawn(move || {
                    let answer = hasync::service::probe(&*me.transport, &me.node, me.timeout);
                    let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.last = Some((Instant::now(), answer));
                    st.running = false;
                    me.done.notify_all();
                });
            }
            // While a newer answer is on its way, the last one serves until
            // it is older than the cache and the deadline together: no
            // request waits for a probe (a load balancer's check has a
            // short timeout of its own), and a probe that hangs turns into
            // "down" within that time.
            if let Some((at, answer)) = &st.last {
                if at.elapsed() < self.cache + self.timeout {
                    return answer.clone();
                }
            }
            let left = (asked + self.timeout).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(AppState {
                    up: false,
                    writable: None,
                    detail: format!(
                        "its probes did not answer within {:.1} s",
                        self.timeout.as_secs_f64()
                    ),
                });
            }
            st = self
                .done
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The node's record from its local state_dir (the config's role before the
/// first cycle), or why it cannot be read.
fn record(node: &Node) -> Result<StateRecord, String> {
    let path = format!("{}/state.json", node.state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<StateRecord>(&bytes)
            .map_err(|e| format!("{path}: {e}"))
            .and_then(|r| {
                if r.node == node.name {
                    Ok(r)
                } else {
                    Err(format!("{path} is the record of node {}", r.node))
                }
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateRecord::initial(node)),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

fn answer(mut stream: TcpStream, node: &Node, prober: &Arc<Prober>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers (bounded).
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match path {
        "/primary" | "/standby" | "/health" => match record(node) {
            Err(e) => (503, format!("state unreadable: {e}\n")),
            Ok(r) => {
                let activity = hasync::lock::local_activity(node);
                // A run that has the service down needs no probe to say so.
                let app = if held_down(activity.as_ref()) {
                    None
                } else {
                    prober.get()
                };
                let view = View {
                    record: &r,
                    activity: activity.as_ref(),
                    app: app.as_ref(),
                    has_service: node.service.is_some(),
                };
                match path {
                    "/primary" => view.role_answer(NodeRole::Primary),
                    "/standby" => view.role_answer(NodeRole::Standby),
                    _ => view.health(),
                }
            }
        },
        _ => (404, "try /primary, /standby or /health\n".to_string()),
    };
    let (reason, kind) = match code {
        200 => ("OK", "text/plain"),
        404 => ("Not Found", "text/plain"),
        _ => ("Service Unavailable", "text/plain"),
    };
    let kind = if path == "/health" {
        "application/json"
    } else {
        kind
    };
    write!(
        stream,
        "HTTP/1.0 {code} {reason}\r\nContent-Type: {kind}; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether a run holding the lock has this node's service down now.
fn held_down(a: Option<&Activity>) -> bool {
    a.and_then(|a| a.step.as_ref())
        .is_some_and(|s| s.service == ServiceStep::Down)
}

/// What one answer is made of.
struct View<'a> {
    record: &'a StateRecord,
    activity: Option<&'a Activity>,
    /// `None`: not probed (held down, or no service configured).
    app: Option<&'a AppState>,
    has_service: bool,
}

impl View<'_> {
    fn step(&self) -> Option<&str> {
        self.activity
            .and_then(|a| a.step.as_ref())
            .map(|s| s.step.as_str())
    }

    /// Why the application does not serve in `mode`, or `None` if it does.
    fn not_serving(&self, mode: Mode) -> Option<String> {
        if held_down(self.activity) {
            return Some(format!(
                "{}: hasync has its service stopped",
                self.step().unwrap_or("a run")
            ));
        }
        if !self.has_service {
            return None;
        }
        let app = self.app?;
        if app.serves_in(mode) {
            None
        } else if !app.up {
            Some(format!("the application is down ({})", app.detail))
        } else {
            Some(format!(
                "the application runs {}, its writable_check says",
                if mode == Mode::Writable {
                    "read-only"
                } else {
                    "writable"
                }
            ))
        }
    }

    fn role_answer(&self, want: NodeRole) -> (u16, String) {
        let r = self.record;
        let mut text = format!("{} is {} at epoch {}", r.node, r.role, r.epoch);
        let mode = if want == NodeRole::Primary {
            Mode::Writable
        } else {
            Mode::ReadOnly
        };
        let why = self.not_serving(mode);
        match (&why, self.app) {
            (Some(w), _) => text += &format!("; {w}"),
            (None, Some(app)) => text += &format!("; application {}", app.describe()),
            (None, None) => {}
        }
        if let (None, Some(step)) = (&why, self.step()) {
            text += &format!("; {step}");
        }
        text.push('\n');
        if r.role == want && why.is_none() {
            (200, text)
        } else {
            (503, text)
        }
    }

    fn health(&self) -> (u16, String) {
        let r = self.record;
        let mode = if r.role == NodeRole::Primary {
            Mode::Writable
        } else {
            Mode::ReadOnly
        };
        let why = self.not_serving(mode);
        let up = !held_down(self.activity) && self.app.is_none_or(|a| a.up);
        let body = serde_json::json!({
            "node": r.node,
            "role": r.role,
            "epoch": r.epoch,
            "serving": why.is_none(),
            "reason": why,
            "application": self.app.map(|a| serde_json::json!({
                "up": a.up, "writable": a.writable, "detail": a.detail,
            })),
            "activity": self.activity.map(|a| serde_json::json!({
                "holder": a.holder,
                "step": a.step.as_ref().map(|s| &s.step),
                "service": a.step.as_ref().map(|s| s.service),
            })),
            "last_cycle": r.last_cycle.as_ref().map(|c| serde_json::json!({
                "outcome": c.outcome, "ended": c.ended, "reason": c.reason,
            })),
        })
        .to_string()
            + "\n";
        (if up { 200 } else { 503 }, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hasync::lock::Step;

    fn record(role: NodeRole) -> StateRecord {
        let mut r: StateRecord =
            serde_json::from_str(r#"{"node": "okm1", "role": "primary", "epoch": 3}"#).unwrap();
        r.role = role;
        r
    }

    fn app(up: bool, writable: Option<bool>) -> AppState {
        AppState {
            up,
            writable,
            detail: "probed".into(),
        }
    }

    fn activity(service: ServiceStep) -> Activity {
        Activity {
            holder: "host=h pid=1 started=now".into(),
            step: Some(Step {
                step: "cycle: final file pass".into(),
                service,
            }),
        }
    }

    fn answer(
        role: NodeRole,
        want: NodeRole,
        a: Option<&Activity>,
        app: Option<&AppState>,
    ) -> (u16, String) {
        View {
            record: &record(role),
            activity: a,
            app,
            has_service: true,
        }
        .role_answer(want)
    }

    #[test]
    fn primary_is_200_only_while_its_application_serves_writable() {
        use NodeRole::*;
        let up_rw = app(true, Some(true));
        assert_eq!(answer(Primary, Primary, None, Some(&up_rw)).0, 200);
        assert_eq!(answer(Standby, Primary, None, Some(&up_rw)).0, 503);
        let (code, body) = answer(Primary, Primary, None, Some(&app(false, None)));
        assert_eq!(code, 503);
        assert!(body.contains("the application is down (probed)"), "{body}");
        let (code, body) = answer(Primary, Primary, None, Some(&app(true, Some(false))));
        assert_eq!(code, 503);
        assert!(body.contains("runs read-only"), "{body}");
        // Mode unknown (no writable_check): up is enough.
        assert_eq!(
            answer(Primary, Primary, None, Some(&app(true, None))).0,
            200
        );
        // A standby must run read-only.
        assert_eq!(
            answer(Standby, Standby, None, Some(&app(true, Some(false)))).0,
            200
        );
        assert_eq!(answer(Standby, Standby, None, Some(&up_rw)).0, 503);
    }

    #[test]
    fn a_run_that_holds_the_service_down_is_503_naming_its_step() {
        use NodeRole::*;
        let down = activity(ServiceStep::Down);
        let (code, body) = answer(Primary, Primary, Some(&down), None);
        assert_eq!(code, 503);
        assert!(
            body.contains("cycle: final file pass: hasync has its service stopped"),
            "{body}"
        );
        // Released: the probes decide, and the step is still named.
        let starting = activity(ServiceStep::Starting);
        let (code, body) = answer(
            Primary,
            Primary,
            Some(&starting),
            Some(&app(true, Some(true))),
        );
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("cycle: final file pass"), "{body}");
        let (code, _) = answer(Primary, Primary, Some(&starting), Some(&app(false, None)));
        assert_eq!(code, 503);
    }

    #[test]
    fn without_a_service_the_record_decides() {
        let v = View {
            record: &record(NodeRole::Primary),
            activity: None,
            app: None,
            has_service: false,
        };
        assert_eq!(v.role_answer(NodeRole::Primary).0, 200);
        assert_eq!(v.role_answer(NodeRole::Standby).0, 503);
        assert_eq!(v.health().0, 200);
    }
}
