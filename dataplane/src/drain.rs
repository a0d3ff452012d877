//! Per-core drain signal: a one-shot notifier that idle connections wait on, so that SIGTERM
//! closes keep-alive connections between requests at once instead of at their idle timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    fired: bool,
    next: u64,
    waiters: HashMap<u64, Waker>,
}

/// Cheap to clone; all clones share one state (core-local).
#[derive(Clone, Default)]
pub struct Drain(Rc<RefCell<Inner>>);

impl Drain {
    pub fn fire(&self) {
        let waiters = {
            let mut inner = self.0.borrow_mut();
            inner.fired = true;
            std::mem::take(&mut inner.waiters)
        };
        waiters.into_values().for_each(Waker::wake);
    }

    pub fn is_fired(&self) -> bool {
        self.0.borrow().fired
    }

    /// Resolves once `fire` has been called.
    pub fn wait(&self) -> Wait {
        Wait {
            drain: self.clone(),
            id: None,
        }
    }
}

pub struct Wait {
    drain: Drain,
    id: Option<u64>,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.drain.0.borrow_mut();
        if inner.fired {
            return Poll::Ready(());
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                inner.next += 1;
                inner.next
            }
        };
        inner.waiters.insert(id, cx.waker().clone());
        drop(inner);
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.drain.0.borrow_mut().waiters.remove(&id);
        }
    }
}
