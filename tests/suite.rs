//! Every integration test in one binary, a module per area. Each area was a binary of its own,
//! and each binary compiled the engine's generic code again: eight of them took 2½ minutes of
//! a core apiece, most of a CI run's compiling. Areas run side by side now, as the tests of one
//! area always did; the tests that must not share the machine still take their area's lock.

mod adapter;
mod bad_input;
mod eval;
mod generate;
mod golden;
mod import;
mod kernels;
mod lora;
mod quant;
mod regress;
mod train;
