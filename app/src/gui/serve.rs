//! The Serve panel: the loaded model and chosen adapters behind the OpenAI-compatible server
//! (`codelsi serve`), on localhost, off until switched on; the address to paste into an editor
//! and the live counts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, channel};

use codelsi_engine::cancel::CancelToken;
use eframe::egui;

use super::{Shared, adapter_names, on_model};
use crate::cli::serve::adapter_catalogue;
use crate::serve::{Metrics, Settings, serve};

/// What the server's thread reports.
enum Msg {
    Listening(SocketAddr),
    Stopped(Result<(), String>),
}

/// A server that was switched on.
struct Running {
    stop: CancelToken,
    metrics: Arc<Metrics>,
    messages: Receiver<Msg>,
    address: Option<SocketAddr>,
    /// The model it serves (switching models stops it).
    model: String,
}

pub struct ServePanel {
    pub port: u16,
    /// Which of `settings.adapters` the server offers, by folder.
    pub offered: Vec<PathBuf>,
    running: Option<Running>,
    pub error: Option<String>,
}

impl Default for ServePanel {
    fn default() -> Self {
        Self {
            port: 8080,
            offered: Vec::new(),
            running: None,
            error: None,
        }
    }
}

impl ServePanel {
    /// The address clients use, once the server listens.
    pub fn address(&self) -> Option<String> {
        let addr = self.running.as_ref()?.address?;
        Some(format!("http://{addr}/v1"))
    }

    pub fn serving(&self) -> bool {
        self.running.is_some()
    }

    pub fn poll(&mut self, shared: &Shared) {
        let model_now = shared
            .model
            .as_ref()
            .map(|m| m.info().path.display().to_string());
        let Some(running) = &mut self.running else {
            return;
        };
        if model_now.as_deref() != Some(running.model.as_str()) {
            // Another model was loaded: this server's is gone from the app.
            running.stop.cancel();
        }
        while let Ok(msg) = running.messages.try_recv() {
            match msg {
                Msg::Listening(addr) => running.address = Some(addr),
                Msg::Stopped(result) => {
                    self.error = result.err();
                    self.running = None;
                    return;
                }
            }
        }
    }

    /// Starts serving the loaded model with the offered adapters.
    pub fn start(&mut self, shared: &Shared) {
        self.error = None;
        let Some(model) = shared.model.clone() else {
            self.error = Some("load a model first".into());
            return;
        };
        let catalogue = match adapter_catalogue(&self.offered) {
            Ok(c) => c,
            Err(e) => {
                self.error = Some(format!("{e:#}"));
                return;
            }
        };
        let info = model.info();
        let path = info.path.display().to_string();
        let base_id = info.id();
        let (stop, metrics) = (CancelToken::new(), Arc::new(Metrics::default()));
        let settings = Settings {
            host: "127.0.0.1".into(),
            port: self.port,
            api_key: None,
            max_queue: 32,
            max_batch: 16,
            max_adapters: 8,
            catalogue,
            base_id,
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let (tx, messages) = channel();
        let result = std::thread::Builder::new()
            .name("codelsi-serve".into())
            .spawn(move || {
                let ready_tx = tx.clone();
                let ready = move |addr| {
                    let _ = ready_tx.send(Msg::Listening(addr));
                };
                let result = on_model!(model, m => serve(m, settings, ready));
                let _ = tx.send(Msg::Stopped(result.map_err(|e| format!("{e:#}"))));
            });
        if let Err(e) = result {
            self.error = Some(format!("could not start the server's thread: {e}"));
            return;
        }
        self.running = Some(Running {
            stop,
            metrics,
            messages,
            address: None,
            model: path,
        });
    }

    pub fn stop(&mut self) {
        if let Some(r) = &self.running {
            r.stop.cancel();
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Serve");
        ui.label(
            "Your model and adapters behind an OpenAI-compatible API on this machine only \
             (127.0.0.1), for an editor's assistant (Continue, Zed, a Neovim plugin) or a script. \
             A request picks an adapter by its `model`: the adapter's name, or `general+specialised`.",
        );
        ui.add_space(8.0);
        if shared.model.is_none() {
            ui.weak("Load a model in the Model tab first.");
            return;
        }
        let serving = self.serving();
        ui.add_enabled_ui(!serving, |ui| {
            ui.horizontal(|ui| {
                ui.label("Port");
                ui.add(egui::DragValue::new(&mut self.port).range(1024..=65535));
            });
            let dirs = shared.settings.adapters.clone();
            if dirs.is_empty() {
                ui.weak("No adapters yet: the base model alone is served.");
            }
            for (dir, name) in dirs.iter().zip(adapter_names(&dirs)) {
                let mut on = self.offered.contains(dir);
                if ui.checkbox(&mut on, &name).changed() {
                    if on {
                        self.offered.push(dir.clone());
                    } else {
                        self.offered.retain(|d| d != dir);
                    }
                }
            }
        });
        ui.add_space(8.0);
        let mut switch = serving;
        let label = if serving {
            "Stop serving"
        } else {
            "Start serving"
        };
        if ui.toggle_value(&mut switch, label).changed() {
            if switch {
                self.start(shared);
            } else {
                self.stop();
            }
        }
        if let Some(r) = &self.running {
            match self.address() {
                Some(address) => {
                    ui.horizontal(|ui| {
                        ui.label("Address for the editor:");
                        ui.monospace(&address);
                        if ui.button("Copy").clicked() {
                            ui.ctx().copy_text(address.clone());
                        }
                    });
                }
                None => {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label("starting…");
                    });
                }
            }
            let m = &r.metrics;
            ui.label(format!(
                "{} requests ({} turned away), {} waiting, {} tokens generated",
                m.requests.load(Relaxed),
                m.rejected.load(Relaxed),
                m.queued.load(Relaxed),
                m.generated_tokens.load(Relaxed),
            ));
            // The counts change without input: keep drawing while serving.
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(500));
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }
}
