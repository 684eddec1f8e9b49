//! `tracer top`: a live view of the running daemon over its API socket — watts and energy per
//! device, services with their processes, GPUs and requests in flight, the latest requests'
//! energy, and every kind of loss. `--once` (or output that is not a terminal) prints one
//! frame as text, rendered by the same code.

use std::{
    io::IsTerminal as _,
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    Frame, Terminal,
    backend::TestBackend,
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    widgets::{Block, Paragraph, Row, Table},
};
use serde_json::Value;

use super::{TopArgs, query::get};

/// One look at the daemon.
struct Sample {
    at: Instant,
    health: Value,
    services: Value,
    /// `None`: devices are root's and the API group's only.
    gpus: Option<Value>,
    recent: Value,
}

fn sample(socket: &Path) -> anyhow::Result<Sample> {
    Ok(Sample {
        at: Instant::now(),
        health: get(socket, "/health")?,
        services: get(socket, "/v1/services")?,
        gpus: get(socket, "/v1/gpus").ok(),
        recent: get(socket, "/v1/requests?limit=12")?,
    })
}

/// What a frame shows: the newest sample, and watts from the one before.
struct View {
    now: Sample,
    watts: Vec<Option<f64>>,
}

impl View {
    fn new(now: Sample, before: Option<&Sample>) -> Self {
        let devices = |s: &Sample| {
            s.gpus
                .as_ref()
                .and_then(|g| g["devices"].as_array().cloned())
                .unwrap_or_default()
        };
        let watts = devices(&now)
            .iter()
            .map(|d| {
                let b = before?;
                let dt = now.at.duration_since(b.at).as_secs_f64();
                let was = devices(b).into_iter().find(|x| x["name"] == d["name"])?["measured_j"]
                    .as_f64()?;
                let now_j = d["measured_j"].as_f64()?;
                (dt > 0.0).then(|| (now_j - was) / dt)
            })
            .collect();
        View { now, watts }
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

/// Draws one frame.
fn draw(f: &mut Frame<'_>, v: &View) {
    let health = &v.now.health;
    let counts = &health["counts"];
    let ring_dropped: u64 = health["kernel"]["dropped"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    let status = format!(
        "tracer {}  records kept {}  stored {} (failed {})  | ring drops {}  undecodable {}  truncated {}  resyncs {}  pieces lost {}",
        text(&health["version"]),
        text(&health["records_kept"]),
        text(&health["store"]["committed"]),
        text(&health["store"]["failed"]),
        ring_dropped,
        text(&counts["user"]["decode_errors"]),
        text(&counts["http"]["truncated"]),
        text(&counts["http"]["resyncs"]),
        text(&counts["data_pieces_lost"]),
    );
    let services = v.now.services["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let devices = v
        .now
        .gpus
        .as_ref()
        .and_then(|g| g["devices"].as_array().cloned());
    let recent = v.now.recent["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [top, dev, svc, req] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(devices.as_ref().map_or(3, |d| d.len() as u16 + 3)),
        Constraint::Length(services.len() as u16 + 3),
        Constraint::Min(4),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(status).block(Block::bordered().title("tracer top (q quits)")),
        top,
    );
    match devices {
        Some(devices) => {
            let rows = devices.iter().zip(&v.watts).map(|(d, w)| {
                Row::new(vec![
                    text(&d["name"]),
                    text(&d["kind"]),
                    w.map_or_else(|| "…".into(), |w| format!("{w:.1}")),
                    num(&d["measured_j"], 1),
                    format!(
                        "{:.1}",
                        d["request_dynamic_j"].as_f64().unwrap_or(0.0)
                            + d["request_idle_j"].as_f64().unwrap_or(0.0)
                    ),
                    num(&d["idle_j"], 1),
                    num(&d["unattributed_j"], 1),
                    format!("{} W ({})", num(&d["idle_w"], 1), text(&d["idle_basis"])),
                ])
            });
            let widths = [
                Constraint::Length(14),
                Constraint::Length(12),
                Constraint::Length(9),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Min(16),
            ];
            let header = Row::new(vec![
                "device",
                "kind",
                "W now",
                "measured J",
                "requests J",
                "idle J",
                "unattrib J",
                "idle",
            ])
            .style(bold());
            f.render_widget(
                Table::new(rows, widths)
                    .header(header)
                    .block(Block::bordered().title("devices")),
                dev,
            );
        }
        None => f.render_widget(
            Paragraph::new("devices are the whole host's: root or the API group only")
                .block(Block::bordered().title("devices")),
            dev,
        ),
    }
    let rows = services.iter().map(|s| {
        let gpus = s["gpus"]
            .as_array()
            .map(|g| {
                g.iter()
                    .map(|x| text(&x["device"]))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        Row::new(vec![
            text(&s["id"]),
            text(&s["name"]),
            s["members"]
                .as_object()
                .map_or(0, serde_json::Map::len)
                .to_string(),
            if gpus.is_empty() { "-".into() } else { gpus },
            text(&s["in_flight"]),
        ])
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(4),
                Constraint::Length(28),
                Constraint::Length(10),
                Constraint::Length(20),
                Constraint::Min(10),
            ],
        )
        .header(Row::new(vec!["id", "service", "processes", "GPUs", "in flight"]).style(bold()))
        .block(Block::bordered().title("services")),
        svc,
    );
    let rows = recent.iter().map(|r| {
        Row::new(vec![
            text(&r["id"]),
            text(&r["service_name"]),
            text(&r["model"]),
            text(&r["outcome"]),
            text(&r["completion_tokens"]),
            num(&r["total_j"], 3),
            num(&r["uncertainty_j"], 3),
            num(&r["joules_per_output_token"], 4),
        ])
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(8),
                Constraint::Length(16),
                Constraint::Length(20),
                Constraint::Length(12),
                Constraint::Length(7),
                Constraint::Length(10),
                Constraint::Length(9),
                Constraint::Min(9),
            ],
        )
        .header(
            Row::new(vec![
                "id", "service", "model", "outcome", "tokens", "J", "± J", "J/token",
            ])
            .style(bold()),
        )
        .block(Block::bordered().title("latest requests")),
        req,
    );
}

/// One frame as text: two samples an interval apart (watts need two).
fn once(a: &TopArgs) -> anyhow::Result<()> {
    let first = sample(&a.socket)?;
    std::thread::sleep(Duration::from_millis(a.interval_ms));
    let view = View::new(sample(&a.socket)?, Some(&first));
    let rows = |v: &Value, key: &str| v[key].as_array().map_or(0, Vec::len) as u16;
    let height = 3
        + 3
        + view.now.gpus.as_ref().map_or(1, |g| rows(g, "devices"))
        + 3
        + rows(&view.now.services, "services")
        + 3
        + rows(&view.now.recent, "requests").max(1);
    let mut t = Terminal::new(TestBackend::new(132, height))?;
    t.draw(|f| draw(f, &view))?;
    let buf = t.backend().buffer();
    let width = buf.area.width as usize;
    let cells: Vec<&str> = buf
        .content()
        .iter()
        .map(ratatui::buffer::Cell::symbol)
        .collect();
    for line in cells.chunks(width) {
        println!("{}", line.concat().trim_end());
    }
    Ok(())
}

/// Runs the view until q, Esc or Ctrl-C.
pub fn run(a: &TopArgs) -> anyhow::Result<()> {
    if a.once || !std::io::stdout().is_terminal() {
        return once(a);
    }
    // Fail before taking the terminal over when the daemon cannot be asked.
    let mut before = Some(sample(&a.socket)?);
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            let now = sample(&a.socket)?;
            let next_before = Sample {
                at: now.at,
                health: Value::Null,
                services: Value::Null,
                gpus: now.gpus.clone(),
                recent: Value::Null,
            };
            let view = View::new(now, before.as_ref());
            terminal.draw(|f| draw(f, &view))?;
            before = Some(next_before);
            let until = Instant::now() + Duration::from_millis(a.interval_ms.max(100));
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                        && key.code == KeyCode::Char('c');
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}
