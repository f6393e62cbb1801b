//! Stop strings in streamed text.

/// Finds stop strings in streamed text. Text that might be the start of a stop string is held back
/// until it is clear that it is not.
/// It owns its strings so that a server can keep one per running request.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.to_vec(), pending: String::new() }
    }

    /// Adds `text`; returns the text that is safe to emit, and whether a stop string was hit
    /// (then the returned text ends right before it).
    pub fn feed(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.pending.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        (out, false)
    }

    /// The held-back text, once the stream has ended without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_even_across_pieces() {
        let stops = vec!["\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("Hello"), ("Hello".into(), false));
        assert_eq!(m.feed(" there\nUs"), (" there".into(), false));
        assert_eq!(m.feed("er: hi"), ("".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("the EN"), ("the ".into(), false));
        assert_eq!(m.feed("D"), ("".into(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("E"), ("".into(), false));
        assert_eq!(m.feed("nd"), ("End".into(), false));
        assert_eq!(m.feed("EN"), ("".into(), false));
        assert_eq!(m.finish(), "EN");
    }
}
