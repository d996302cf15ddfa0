//! Top-ups through Stripe: the paid invoice lines whose price a product lists in `stripe_credit_prices`.
