//! Database migrations, written once for PostgreSQL and SQLite.
//!
//! Each migration is a sea-query schema builder, so the same code renders
//! the dialect of whichever database it runs against.

pub use sea_orm_migration::prelude::*;

mod m0001_initial;
mod m0002_priority;
mod m0003_detection;
mod m0004_redrive;
mod m0005_security;
mod m0006_trace;
mod m0007_partial_indexes;
mod m0008_object_key_index;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_priority::Migration),
            Box::new(m0003_detection::Migration),
            Box::new(m0004_redrive::Migration),
            Box::new(m0005_security::Migration),
            Box::new(m0006_trace::Migration),
            Box::new(m0007_partial_indexes::Migration),
            Box::new(m0008_object_key_index::Migration),
        ]
    }
}
