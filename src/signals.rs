//! SIGINT and SIGTERM, turned into a call on an ordinary thread.
//!
//! The handler only writes the signal number into a pipe (async-signal-safe);
//! a thread reads it and runs the handler the running command registered on
//! a thread of its own (the cycle: restart what it stopped, record
//! "interrupted", release the lock, exit 130), so that it still reads the
//! next one while the handler works. A second signal, or one with no handler registered, ends
//! the process at once with 130. `SA_RESTART` keeps other threads' system
//! calls from failing with EINTR.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, Once};

type Handler = Box<dyn Fn(i32) + Send>;

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static COUNT: AtomicU32 = AtomicU32::new(0);
static HANDLER: Mutex<Option<Handler>> = Mutex::new(None);
static INSTALL: Once = Once::new();

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte from a local.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Install the handlers (once per process).
pub fn install() {
    INSTALL.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        PIPE_WRITE.store(fds[1], Ordering::Relaxed);
        let read_fd = fds[0];
        std::thread::Builder::new()
            .name("hasync-signals".into())
            .spawn(move || loop {
                let mut b = 0u8;
                // SAFETY: reading one byte into a local from our own pipe.
                let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
                if n != 1 {
                    continue;
                }
                let sig = b as i32;
                if COUNT.fetch_add(1, Ordering::SeqCst) > 0 {
                    eprintln!("hasync: second {}: aborting at once", name(sig));
                    // SAFETY: ends the process; nothing to unwind.
                    unsafe { libc::_exit(130) };
                }
                let handler = HANDLER.lock().unwrap_or_else(|p| p.into_inner()).take();
                // The handler runs on a thread of its own: it takes as long
                // as the restart it does, and meanwhile this thread must
                // still read a second signal.
                match handler {
                    Some(h) => {
                        let spawned = std::thread::Builder::new()
                            .name("hasync-on-signal".into())
                            .spawn(move || h(sig));
                        if spawned.is_err() {
                            eprintln!(
                                "hasync: {}: cannot start the handler's thread; aborting",
                                name(sig)
                            );
                            std::process::exit(130);
                        }
                    }
                    None => std::process::exit(130),
                }
            })
            .expect("start the signal thread");
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a plain handler that only writes to a pipe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// What the first signal does from now on (it must end the process).
pub fn set_handler(h: impl Fn(i32) + Send + 'static) {
    install();
    *HANDLER.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(h));
}

/// Back to the default: a signal ends the process with 130.
pub fn clear_handler() {
    *HANDLER.lock().unwrap_or_else(|p| p.into_inner()) = None;
}
