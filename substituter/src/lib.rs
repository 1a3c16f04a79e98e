//! The runner-side substituter and push client. Not implemented yet: see issue 4 and the README.
