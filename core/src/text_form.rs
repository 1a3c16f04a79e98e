//! Types whose one text form is their Display, Debug and serde form.

/// Implements `Display`, `Debug` (as `Type(text)`), `Serialize` and `Deserialize` for a type
/// from the method that renders its text form and its `FromStr`, so that what is printed, logged
/// and sent on the wire is always the same string, parsed back the same way. A third argument
/// names the parsing function that `FromStr` is then implemented with.
macro_rules! text_form {
    ($type:ident, $render:ident, $parse:ident) => {
        impl ::std::str::FromStr for $type {
            type Err = $crate::Error;

            fn from_str(text: &str) -> $crate::Result<Self> {
                Self::$parse(text)
            }
        }

        $crate::text_form::text_form!($type, $render);
    };
    ($type:ident, $render:ident) => {
        impl ::std::fmt::Display for $type {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.$render())
            }
        }

        impl ::std::fmt::Debug for $type {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, concat!(stringify!($type), "({})"), self.$render())
            }
        }

        impl ::serde::Serialize for $type {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> ::std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.$render())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $type {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> ::std::result::Result<Self, D::Error> {
                // Borrowed when the input allows: chunk lists hold many thousands of hashes.
                let text = <::std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use text_form;
