//! Routes and clusters written in the local config file.
