//! Panics inside a simulation are findings, not crashes of the simulator: an assertion in
//! raft-rs, core or storage is reported as a violation of the seed that hit it.
//!
//! The default panic hook would print every such panic (with a backtrace when
//! `RUST_BACKTRACE` is set) from every thread of a campaign; [`install_quiet_panic_hook`]
//! replaces it, for threads that are running a simulation only, with one that records
//! where the panic happened so the report can say it. Panics anywhere else still go to the
//! previous hook.

use std::cell::{Cell, RefCell};
use std::sync::Once;

thread_local! {
    static SIMULATING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook (once per process; later calls do nothing).
pub fn install_quiet_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if SIMULATING.with(Cell::get) {
                let location = info
                    .location()
                    .map(|location| format!("{}:{}", location.file(), location.line()));
                LAST_PANIC_LOCATION.with(|last| *last.borrow_mut() = location);
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `body` as a simulation on this thread: a panic in it is returned as its message
/// (with its location when the quiet hook is installed) instead of unwinding further.
pub fn catch_simulation_panic(body: impl FnOnce()) -> Result<(), String> {
    SIMULATING.with(|simulating| simulating.set(true));
    LAST_PANIC_LOCATION.with(|last| *last.borrow_mut() = None);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    SIMULATING.with(|simulating| simulating.set(false));
    outcome.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
            })
            .unwrap_or_else(|| "a panic without a message".to_owned());
        match LAST_PANIC_LOCATION.with(|last| last.borrow_mut().take()) {
            Some(location) => format!("{message} (at {location})"),
            None => message,
        }
    })
}
