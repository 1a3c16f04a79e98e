//! Wire types of the HTTP APIs, shared by the server and its clients.
pub mod v1;
