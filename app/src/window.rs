//! A minimal desktop window (eframe, wgpu renderer) until the full app lands: load the default
//! model and generate. Work runs on a background thread; the UI never blocks.

use std::sync::mpsc::{Receiver, channel};

use anyhow::Result;
use codelsi_engine::device::{Wgpu, init_wgpu};
use codelsi_engine::generate::{CancelToken, GenerateOptions, generate};
use codelsi_engine::model::{LoadedModel, load_model, resolve_model};

enum Msg {
    Loaded(Box<LoadedModel<Wgpu>>),
    Text(String),
    Done(String),
    Error(String),
}

#[derive(Default)]
struct App {
    status: String,
    prompt: String,
    output: String,
    model: Option<std::sync::Arc<LoadedModel<Wgpu>>>,
    rx: Option<Receiver<Msg>>,
    cancel: CancelToken,
    busy: bool,
}

pub fn run() -> Result<()> {
    let options = eframe::NativeOptions::default();
    let app = App {
        status: "No model loaded.".into(),
        prompt: "function isPalindrome(s: string): boolean {".into(),
        ..Default::default()
    };
    eframe::run_native("codelsi", options, Box::new(|_cc| Ok(Box::new(app))))
        .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

impl App {
    fn load_default(&mut self) {
        let (tx, rx) = channel();
        self.rx = Some(rx);
        self.busy = true;
        self.status = "Loading the default model…".into();
        std::thread::spawn(move || {
            let result = (|| -> codelsi_engine::Result<LoadedModel<Wgpu>> {
                let path = resolve_model("default", &mut |_| {})?;
                let (device, _) = init_wgpu()?;
                load_model::<Wgpu>(&path, None, &device, &mut |_| {})
            })();
            let _ = tx.send(match result {
                Ok(m) => Msg::Loaded(Box::new(m)),
                Err(e) => Msg::Error(e.to_string()),
            });
        });
    }

    fn start_generate(&mut self) {
        let Some(model) = self.model.clone() else {
            return;
        };
        let (tx, rx) = channel();
        self.rx = Some(rx);
        self.busy = true;
        self.output.clear();
        self.cancel = CancelToken::new();
        let cancel = self.cancel.clone();
        let prompt = self.prompt.clone();
        std::thread::spawn(move || {
            let result = model.tokenizer.encode(&prompt, true).and_then(|ids| {
                let opts = GenerateOptions {
                    max_tokens: 128,
                    ..Default::default()
                };
                generate(
                    &model.model,
                    &model.tokenizer,
                    &ids,
                    &opts,
                    &cancel,
                    &mut |t| {
                        let _ = tx.send(Msg::Text(t.to_string()));
                    },
                )
            });
            let _ = tx.send(match result {
                Ok(o) => Msg::Done(format!(
                    "{} tokens, {:.1} tok/s",
                    o.token_ids.len(),
                    o.decode_tokens_per_second()
                )),
                Err(e) => Msg::Error(e.to_string()),
            });
        });
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut eframe::egui::Ui, _frame: &mut eframe::Frame) {
        if let Some(rx) = &self.rx {
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Msg::Loaded(m) => {
                        self.status = format!(
                            "{} — {} ({})",
                            m.info.path.display(),
                            m.info.architecture,
                            m.info.quantization
                        );
                        self.model = Some(std::sync::Arc::new(*m));
                        self.busy = false;
                    }
                    Msg::Text(t) => self.output.push_str(&t),
                    Msg::Done(s) => {
                        self.status = s;
                        self.busy = false;
                    }
                    Msg::Error(e) => {
                        self.status = format!("Error: {e}");
                        self.busy = false;
                    }
                }
            }
            ui.ctx().request_repaint();
        }
        eframe::egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("codelsi");
            ui.label(&self.status);
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(
                        !self.busy && self.model.is_none(),
                        eframe::egui::Button::new("Load default model"),
                    )
                    .clicked()
                {
                    self.load_default();
                }
                if ui
                    .add_enabled(
                        !self.busy && self.model.is_some(),
                        eframe::egui::Button::new("Generate"),
                    )
                    .clicked()
                {
                    self.start_generate();
                }
                if ui
                    .add_enabled(self.busy, eframe::egui::Button::new("Stop"))
                    .clicked()
                {
                    self.cancel.cancel();
                }
            });
            ui.add(
                eframe::egui::TextEdit::multiline(&mut self.prompt)
                    .code_editor()
                    .desired_rows(4)
                    .desired_width(f32::INFINITY),
            );
            ui.separator();
            eframe::egui::ScrollArea::vertical().show(ui, |ui| {
                ui.add(eframe::egui::Label::new(
                    eframe::egui::RichText::new(&self.output).monospace(),
                ));
            });
        });
    }
}
